"""Mixed precision (model.autocast): which dtype is chosen, that the body runs in bfloat16 while the log-prob
head stays float32, that checkpointing replays under the same autocast, that the rollout leaves no autocast
state behind, and that an on-policy GRPO update takes its ratio against the training pass itself."""

import copy

import pytest
import torch

import rlmt.rollout.precision as precision
from rlmt.config import ConfigError, load_config
from rlmt.data import PromptFormat, encode_prompt
from rlmt.rollout.logprobs import grouped_response_logprobs
from rlmt.models import frozen_reference, load_model
from rlmt.rollout.precision import autocast_dtype, compute_autocast
from rlmt.rollout import SamplingParams, generate
from rlmt.train.estimators import advantages_for
from rlmt.train.session import prepare_model
from test_online import _sgd_update  # the same SGD-step helper


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def rollout(lm):
    prompts = [encode_prompt(lm.tokenizer, PromptFormat(), p) for p in ("hello", "what is 2+2")]
    return generate(lm.model, lm.tokenizer, prompts, SamplingParams(4, 1.0, max_new_tokens=6),
                    torch.Generator().manual_seed(0))


def test_autocast_dtype_choices(monkeypatch):
    assert autocast_dtype("none", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert autocast_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert autocast_dtype("auto", "cpu") is None
    with pytest.raises(ValueError, match="model.autocast"):
        autocast_dtype("fp8", "cpu")


def test_native_bf16_without_the_cpu_probe(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.native_bf16("cpu") is False


def test_config_rejects_an_unknown_autocast():
    with pytest.raises(ConfigError, match="autocast"):
        load_config(None, ["model.autocast=fp8"])


def test_prepare_model_and_reference_carry_the_setting(tmp_path):
    cfg = load_config(None, ["model.name=tiny-random", "model.autocast=bfloat16", f"run.output_dir={tmp_path}"])
    loaded = prepare_model(cfg)
    assert loaded.autocast is torch.bfloat16 and frozen_reference(loaded).autocast is torch.bfloat16
    assert not any(k.startswith("rlmt") for k in vars(loaded.model))  # the setting is not hung on the model
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # weights stay float32
    plain = prepare_model(load_config(None, ["model.name=tiny-random", f"run.output_dir={tmp_path}"]))
    assert plain.autocast is None and frozen_reference(plain).autocast is None
    with compute_autocast(plain.model, None):
        assert not torch.is_autocast_enabled("cpu")
    with compute_autocast(plain.model, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def _group_args(batch, G=4):
    P = batch.prompt_len
    return (batch.input_ids[::G, :P], batch.attention_mask[::G, :P], batch.response_ids, batch.response_mask, G)


def test_body_in_bfloat16_head_in_float32(lm, rollout):
    model = copy.deepcopy(lm.model)
    seen, captured = {}, {}
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.update(q=o.dtype))
    model.model.norm.register_forward_hook(lambda m, i, o: captured.update(h=o.detach()))
    lp = grouped_response_logprobs(model, *_group_args(rollout), autocast=torch.bfloat16)
    assert seen["q"] is torch.bfloat16 and lp.dtype == torch.float32
    # the head, independently: log_softmax(h W^T) in float32 from the body's (autocast) final states
    from rlmt.rollout.logprobs import pack_groups

    packed = pack_groups(*_group_args(rollout))
    h = captured["h"].reshape(-1, captured["h"].shape[-1])[packed.source].float()
    ref = torch.log_softmax(h @ model.lm_head.weight.T, -1).gather(-1, packed.targets[:, None]).squeeze(-1)
    assert torch.allclose(lp[rollout.response_mask], ref, atol=1e-5)
    # and bfloat16 really changed the body's numbers (the test would pass vacuously otherwise)
    plain = grouped_response_logprobs(lm.model, *_group_args(rollout))
    assert not torch.allclose(lp, plain, atol=1e-6)
    assert torch.allclose(lp, plain, atol=0.1)


def test_gradient_under_autocast_is_float32_and_close(lm, rollout):
    grads = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(lm.model)
        (grouped_response_logprobs(model, *_group_args(rollout), autocast=dtype) * rollout.response_mask).sum().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads["bf16"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.99


def test_checkpointing_replays_under_the_same_autocast(lm, rollout):
    out = {}
    for ckpt in (False, True):
        model = copy.deepcopy(lm.model)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        lp = grouped_response_logprobs(model, *_group_args(rollout), autocast=torch.bfloat16)
        (lp * rollout.response_mask).sum().backward()
        out[ckpt] = (lp.detach(), [p.grad.clone() for p in model.parameters()])
    assert torch.equal(out[False][0], out[True][0])
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_rollout_under_autocast(lm):
    model = copy.deepcopy(lm.model)
    prompts = [encode_prompt(lm.tokenizer, PromptFormat(), "hello")]
    batch = generate(model, lm.tokenizer, prompts, SamplingParams(4, 1.0, max_new_tokens=6),
                     torch.Generator().manual_seed(0), autocast=torch.bfloat16)
    assert not torch.is_autocast_enabled("cpu")  # nothing left switched on
    assert all(p.dtype == torch.float32 for p in model.parameters())
    m = batch.response_mask
    assert torch.isfinite(batch.logprobs[m]).all() and (batch.logprobs[m] <= 0).all()
    # the sampler's log-probs are those of a bfloat16 forward: close to the training pass's, not equal
    lp = grouped_response_logprobs(model, batch.input_ids[::4, :batch.prompt_len],
                                   batch.attention_mask[::4, :batch.prompt_len], batch.response_ids, m, 4,
                                   autocast=torch.bfloat16)
    assert torch.allclose(lp[m], batch.logprobs[m], atol=0.1)


def test_on_policy_update_takes_the_ratio_against_itself(lm, rollout):
    """Under autocast, one epoch in one optimizer step takes pi_old from the training pass itself, so sampler
    log-probs that disagree (as the bfloat16 sampler's do) neither clip nor change the gradient. In float32,
    or with two minibatches, pi_old is the sampler's, and the same disagreement clips."""
    over = ["algorithm=grpo", "model.name=tiny-random", "optim.max_grad_norm=0", "pg.beta=0",
            "rollout.num_samples=4", "optim.batch_size=8"]
    adv, _ = advantages_for(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1]), 4, load_config(None, over).pg, None)
    skewed = copy.copy(rollout)
    skewed.logprobs = rollout.logprobs + 0.5 * rollout.response_mask  # ratio exp(-0.5) against the sampler
    mixed = torch.bfloat16
    exact, _ = _sgd_update(lm.model, load_config(None, over), rollout, adv, autocast=mixed)
    on, met_on = _sgd_update(lm.model, load_config(None, over), skewed, adv, autocast=mixed)
    assert met_on["clip_frac"] == 0.0 and met_on["ratio_mean"] == pytest.approx(1.0)
    assert met_on["rollout/logprob_gap"] == pytest.approx(0.5, abs=0.05)
    for a, b in zip(exact, on):
        assert torch.allclose(a, b, atol=1e-7)
    for autocast, extra in ((None, []), (mixed, ["pg.minibatches=2"])):
        _, met_off = _sgd_update(lm.model, load_config(None, over + extra), skewed, adv, autocast=autocast)
        assert met_off["clip_frac"] > 0.2 and met_off["ratio_mean"] < 0.7  # tokens with A < 0 clip at 1 - eps

def test_sampling_weights_swap_in_a_cast_copy_and_put_back_the_originals(lm):
    model = copy.deepcopy(lm.model)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: one Parameter, cast once
    before = {n: (p, p.data_ptr(), p.data.clone()) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with precision.sampling_weights(model, torch.bfloat16):
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            assert model.lm_head.weight is model.model.embed_tokens.weight
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        param, ptr, values = before[n]
        assert p is param and p.data_ptr() == ptr and torch.equal(p.data, values)  # the same storage, bit for bit
    plain = copy.deepcopy(lm.model)
    with precision.sampling_weights(plain, None):  # no autocast: untouched
        assert all(p.dtype == torch.float32 for p in plain.parameters())


def test_head_log_probs_exact_and_backward_in_the_autocast_dtype():
    from rlmt.rollout.logprobs import _TargetLogprobs

    torch.manual_seed(0)
    h = torch.randn(70, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.5).requires_grad_()
    t = torch.randint(0, 50, (70,))
    g = torch.randn(70)
    out = {}
    for name, gd in (("fp32", None), ("bf16", torch.bfloat16)):
        h.grad = w.grad = None
        lp, _ = _TargetLogprobs.apply(h, w, None, t, 1.0, 32, False, gd)
        (lp * g).sum().backward()
        out[name] = (lp.detach(), h.grad.clone(), w.grad.clone())
    expected = torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(out["fp32"][0], expected, atol=1e-6)
    assert torch.equal(out["fp32"][0], out["bf16"][0])  # the values never drop to bfloat16
    for a, b in zip(out["fp32"][1:], out["bf16"][1:]):
        assert b.dtype == torch.float32 and not torch.equal(a, b)  # the backward's products did
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_packed_attention_runs_in_float32_under_autocast():
    from rlmt.rollout.attention import _attention, packed_attention, row_layout, PackedLayout

    torch.manual_seed(0)
    layout = PackedLayout((row_layout(3, [2, 4]),))
    q, k, v = (torch.randn(1, 4, 9, 8).bfloat16() for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16):
        out, _ = _attention(None, q, k[:, :2], v[:, :2], None, scaling=0.35, rlmt_layout=layout)  # GQA 4:2
    expected = packed_attention(q.float(), k[:, :2].float(), v[:, :2].float(), layout, 0.35)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected.transpose(1, 2).contiguous())


def test_grpo_end_to_end_with_autocast(tmp_path):
    import json

    from rlmt.records import read_metrics
    from rlmt.train.runner import train

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write a word with letter {c}"}) + "\n" for c in "abcdef"))
    cfg = load_config(None, ["algorithm=grpo", "model.name=tiny-random", "model.autocast=bfloat16",
                             "model.gradient_checkpointing=true", f"data.train={data}", "reward.source=regex",
                             "reward.args={pattern: '[a-m]'}", "rollout.num_samples=4", "rollout.batch_prompts=2",
                             "rollout.max_new_tokens=6", "optim.max_steps=2", "optim.lr=1e-3", "pg.beta=0.1",
                             f"run.output_dir={tmp_path / 'run'}", "run.progress=false"])
    rows = read_metrics(train(cfg))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # policy and reference: same weights, same numerics
    assert rows[0]["rollout/logprob_gap"] > 0  # the bfloat16 sampler is not the training pass, bit for bit
    assert all(r["skipped_steps"] == 0 and r["clip_frac"] == 0.0 for r in rows)  # on-policy: ratio 1


def test_reference_pass_casts_a_file_backed_reference_once_with_the_same_bits(lm, rollout, tmp_path):
    """A reference memory-mapped from its safetensors file, under autocast: inside ``Reference.passes`` its body's
    linear weights are bfloat16 copies (norms, embedding and output layer untouched), its log-probs are the
    same bits as autocast casting at every use, and on exit (also after an error) every parameter is the
    original tensor again."""
    from rlmt.models import LoadedModel

    lm.model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference = frozen_reference(LoadedModel(policy, lm.tokenizer, "local", str(tmp_path), torch.bfloat16))
    assert reference.pages is not None  # paged from the file, the path this is for
    ref = reference.module
    with torch.no_grad():
        expected = grouped_response_logprobs(ref, *_group_args(rollout), autocast=reference.autocast)
    before = {n: (p.data_ptr(), p.dtype) for n, p in ref.named_parameters()}
    linear = {id(m.weight) for m in ref.get_decoder().modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad(), reference.passes():
        dtypes = {id(p): p.dtype for p in ref.parameters()}
        got = grouped_response_logprobs(ref, *_group_args(rollout), autocast=reference.autocast)
    assert len(linear) == 7 * ref.config.num_hidden_layers
    assert {i: d for i, d in dtypes.items() if d == torch.bfloat16}.keys() == linear  # norms, embedding: float32
    assert torch.equal(got, expected)
    assert {n: (p.data_ptr(), p.dtype) for n, p in ref.named_parameters()} == before
    with pytest.raises(RuntimeError, match="boom"), reference.passes():
        raise RuntimeError("boom")
    assert {n: (p.data_ptr(), p.dtype) for n, p in ref.named_parameters()} == before


def test_bfloat16_on_a_cpu_that_emulates_it_warns_once_with_the_measured_slowdown(monkeypatch, capsys):
    import rlmt.train.session as session

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 87.0)  # as measured on an AVX2-only EPYC
    monkeypatch.setattr(session, "_WARNED", {})
    for _ in range(2):
        prepare_model(load_config(None, ["model.name=tiny-random", "model.autocast=bfloat16"]))
    err = capsys.readouterr().err
    assert err.count("bfloat16 matrix product ran 87.0x slower than float32 here; model.autocast=none") == 1
    prepare_model(load_config(None, ["model.name=tiny-random", "model.autocast=auto"]))  # auto: no warning
    assert precision.autocast_dtype("auto", "cpu") is None and "slower" not in capsys.readouterr().err
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 0.4)  # a CPU where bfloat16 is faster: quiet
    assert precision.slow_bf16_warning("bfloat16", "cpu") is None


def test_the_bf16_slowdown_is_measured():
    ratio = precision.bf16_slowdown()
    assert ratio > 0 and ratio == precision.bf16_slowdown()  # measured once per process
