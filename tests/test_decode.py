"""The functional Llama decoder (rlmt.rollout.decode) against the model's own forward: the same logits at prefill
and at every decode step, with left-padded prompts of different lengths, GQA (4 query heads, 2 kv heads),
attention biases, the cache repeated per sample and rows dropped; and which decoder a model gets."""

import copy
import platform

import pytest
import torch

from rlmt.rollout.decode import LlamaDecoder, ModuleDecoder, make_decoder
from rlmt.rollout.logprobs import position_ids_from_mask
from rlmt.models import load_model
from rlmt.rollout import left_pad


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def _drive(decoder, prompts, G=3, steps=5):
    """Prefill, repeat G times, decode ``steps`` tokens (dropping a row after step 2); all logits."""
    ids, mask = left_pad(prompts, 0)
    P, N = ids.shape[1], len(prompts) * G
    out = [decoder.prefill(ids, mask, position_ids_from_mask(mask))]
    decoder.repeat_interleave(G)
    key_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones(N, steps, dtype=torch.long)], 1)
    pos = mask.sum(-1).repeat_interleave(G)
    tok = torch.arange(N) % 50 + 5
    for t in range(steps):
        if t == 2:  # drop row 1, as the rollout drops finished rows
            keep = torch.tensor([r for r in range(len(tok)) if r != 1])
            decoder.select(keep)
            key_mask, pos, tok = key_mask[keep], pos[keep], tok[keep]
        out.append(decoder.step(tok, key_mask[:, :P + t + 1], pos + t))
        tok = out[-1].argmax(-1)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_functional_decoder_matches_the_module(lm, bias):
    model = copy.deepcopy(lm.model).double().eval()
    if bias:  # Qwen2-style q/k/v biases
        torch.manual_seed(0)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, dtype=torch.float64) * 0.1)
    prompts = [[3, 8, 9, 10, 11, 12], [4, 5], [7, 7, 7, 7]]
    with torch.no_grad():
        ref = _drive(ModuleDecoder(model, 16), prompts)
        got = _drive(LlamaDecoder(model, 16), prompts)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


def test_which_decoder(lm, monkeypatch):
    import rlmt.rollout.decode as decode

    # float32 on a CPU: the functional decoder where oneDNN prepacks float32 weights (every x86-64 build of
    # torch), else the module's forward
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert decode._packing(torch.float32)
    assert isinstance(make_decoder(lm.model, 8), LlamaDecoder if decode._packing(torch.float32) else ModuleDecoder)
    monkeypatch.setattr(decode, "_packing", lambda dtype: False)
    assert isinstance(make_decoder(lm.model, 8), ModuleDecoder)
    monkeypatch.undo()
    low = copy.deepcopy(lm.model).to(torch.bfloat16)
    assert isinstance(make_decoder(low, 8), LlamaDecoder)
    windowed = copy.deepcopy(low)
    windowed.config.sliding_window, windowed.config.use_sliding_window = 4, True
    assert isinstance(make_decoder(windowed, 8), ModuleDecoder)  # a window it does not apply
    other = copy.deepcopy(low)
    other.config.model_type = "gpt2"
    assert not LlamaDecoder.supports(other)
    autocast = copy.deepcopy(lm.model)  # float32 weights, bfloat16 sampling: the decoder's own copy
    d = make_decoder(autocast, 8, torch.bfloat16)
    assert isinstance(d, LlamaDecoder) and d.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in autocast.parameters())


def test_own_bfloat16_weights_equal_sampling_from_a_bfloat16_model(lm, monkeypatch):
    """The decoder's own copy of a float32 model's weights (prepacked for oneDNN where this torch can) gives
    bit-identical logits to the plain decoder over the model's parameters swapped to bfloat16
    (:func:`rlmt.rollout.precision.sampling_weights`, what the rollout sampled from before): embedding rows cast after
    lookup, norms, rotary, GQA, every linear."""
    import rlmt.rollout.decode as decode
    from rlmt.rollout.precision import sampling_weights

    model = copy.deepcopy(lm.model)
    prompts = [[3, 8, 9, 10, 11, 12], [4, 5], [7, 7, 7, 7]]
    with torch.no_grad():
        got = _drive(LlamaDecoder(model, 16, torch.bfloat16), prompts)
        monkeypatch.setattr(decode, "_packing", lambda dtype: False)
        with sampling_weights(model, torch.bfloat16):
            ref = _drive(LlamaDecoder(model, 16), prompts)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


def test_prepacked_float32_decoder_matches_the_module(lm):
    """The float32 rollout's decoder (weights prepacked for oneDNN) gives the module's logits within float32
    rounding at every step."""
    import rlmt.rollout.decode as decode

    if not decode._packing(torch.float32):
        pytest.skip("oneDNN does not prepack float32 weights here (test_which_decoder checks where it must)")
    model = copy.deepcopy(lm.model).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a random model's weights at a trained model's scale, so the logits spread
        for p in model.parameters():
            p.mul_(4.0)
    prompts = [[3, 8, 9, 10, 11, 12], [4, 5], [7, 7, 7, 7]]
    with torch.no_grad():
        ref = _drive(ModuleDecoder(model, 16), prompts)
        got = _drive(LlamaDecoder(model, 16), prompts)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (a - b).abs().max()



def test_decoders_in_a_weights_shared_scope_share_one_copy_while_the_model_is_unchanged(lm):
    """Inside weights_shared() decoders of an unchanged model share its cast/prepacked weights; an in-place
    update (what an optimizer step does) makes the next decoder copy again, and it samples from the updated
    weights exactly as a decoder made outside any scope. Outside, each decoder has its own copy."""
    from rlmt.rollout import weights_shared

    model = copy.deepcopy(lm.model).eval()
    prompts = [[3, 8, 9, 10, 11, 12], [4, 5]]
    with torch.no_grad():
        with weights_shared():
            a, b = LlamaDecoder(model, 16, torch.bfloat16), LlamaDecoder(model, 16, torch.bfloat16)
            assert a.layers is b.layers and a.head is b.head
            with weights_shared():  # a nested scope is the outer one
                assert LlamaDecoder(model, 16, torch.bfloat16).layers is a.layers
            assert LlamaDecoder(model, 16).layers is not a.layers  # another dtype, another copy
            model.model.layers[1].mlp.up_proj.weight.add_(0.5)  # an in-place write: its version counter
            c = LlamaDecoder(model, 16, torch.bfloat16)
            assert c.layers is not a.layers
            assert LlamaDecoder(model, 16, torch.bfloat16).layers is c.layers
            # a fused optimizer step leaves version counters as they are; the step itself drops the copies
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
            with torch.enable_grad():
                model(torch.tensor([[3, 4, 5]])).logits.sum().backward()
            opt.step()
            d = LlamaDecoder(model, 16, torch.bfloat16)
            assert d.layers is not c.layers
            got = _drive(d, prompts)
        fresh = LlamaDecoder(model, 16, torch.bfloat16)
        assert fresh.layers is not LlamaDecoder(model, 16, torch.bfloat16).layers
        ref = _drive(fresh, prompts)
        stale = _drive(c, prompts)
    for x, y in zip(got, ref):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(stale, ref))  # the step did change the logits
