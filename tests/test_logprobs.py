"""Chunked and prompt-shared log-probs equal a plain full forward (values and gradients)."""

import copy

import pytest
import torch

from rlmt.data import PromptFormat, encode_prompt
from rlmt.rollout.logprobs import grouped_hidden_states, grouped_response_logprobs, pack_groups, token_logprobs
from rlmt.models import load_model
from rlmt.rollout import SamplingParams, generate


@pytest.fixture(scope="module")
def setup():
    lm = load_model("tiny-random")
    fmt = PromptFormat()
    prompts = [encode_prompt(lm.tokenizer, fmt, p) for p in ("hi", "a longer prompt here", "mid one")]
    batch = generate(lm.model, lm.tokenizer, prompts, SamplingParams(3, 1.0, max_new_tokens=7),
                     torch.Generator().manual_seed(0))
    return lm, batch


def _plain(model, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    lp = torch.log_softmax(logits.float() / 0.8, -1)[:, batch.prompt_len - 1:-1]
    return lp.gather(-1, batch.response_ids[:, :, None]).squeeze(-1) * batch.response_mask


def _grads(model, fn):
    model = copy.deepcopy(model)
    out = fn(model)
    (out * torch.arange(1, out.shape[1] + 1)).sum().backward()  # a position-dependent scalar
    return out.detach(), [p.grad.clone() for p in model.parameters()]




@pytest.fixture(params=["packed", "dense"])
def attention(request, monkeypatch):
    """Both ways the packed rows attend: ``rlmt_packed`` (two SDPA calls a row, rlmt.rollout.attention) and the dense
    (B0, 1, L, L) mask for models on other attention implementations. Asserts the intended one ran."""
    import rlmt.rollout.attention
    import rlmt.rollout.logprobs

    calls = []
    real = rlmt.rollout.attention.packed_attention
    monkeypatch.setattr(rlmt.rollout.attention, "packed_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    if request.param == "dense":
        monkeypatch.setattr(rlmt.rollout.logprobs, "use_packed_attention", lambda model: False)
    yield request.param
    assert bool(calls) == (request.param == "packed")


@pytest.mark.parametrize("chunk", [1024, 5])
def test_token_and_grouped_logprobs_equal_plain_forward(setup, chunk, attention):
    lm, b = setup
    target = torch.zeros_like(b.attention_mask, dtype=torch.bool)
    target[:, b.prompt_len:] = b.response_mask
    ref, ref_g = _grads(lm.model, lambda m: _plain(m, b))
    tok, tok_g = _grads(lm.model, lambda m: token_logprobs(m, b.input_ids, b.attention_mask, target, 0.8,
                                                           chunk_tokens=chunk)[:, b.prompt_len:])
    P = b.prompt_len
    grp, grp_g = _grads(lm.model, lambda m: grouped_response_logprobs(
        m, b.input_ids[::3, :P], b.attention_mask[::3, :P], b.response_ids, b.response_mask, 3, 0.8, chunk))
    assert torch.allclose(tok, ref, atol=1e-5) and torch.allclose(grp, ref, atol=1e-5)
    for a, c, d in zip(ref_g, tok_g, grp_g):
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-4) and torch.allclose(a, d, atol=1e-5, rtol=1e-4)


def _checkpointed(m):
    m.gradient_checkpointing_enable()
    m.train()
    return m


def test_grouped_logprobs_under_checkpointing(setup, attention):
    """The packed single pass needs no cache, so gradient checkpointing applies as usual: same numbers."""
    lm, b = setup
    P = b.prompt_len
    ref, ref_g = _grads(lm.model, lambda m: _plain(m, b))
    grp, grp_g = _grads(lm.model, lambda m: grouped_response_logprobs(
        _checkpointed(m), b.input_ids[::3, :P], b.attention_mask[::3, :P], b.response_ids, b.response_mask, 3, 0.8, 5))
    assert torch.allclose(grp, ref, atol=1e-5)
    for a, d in zip(ref_g, grp_g):
        assert torch.allclose(a, d, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_hidden_states_share_the_prompt_kv_under_checkpointing(setup, checkpointing):
    """PPO's per-position hidden states: the prompt's KV is shared through replay-safe caches, which
    transformers would otherwise drop under checkpointing (then the responses would not see the prompt)."""
    lm, b = setup
    P = b.prompt_len
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def plain(m):
        h = m.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos).last_hidden_state
        return h[:, P - 1:-1] * b.response_mask[..., None]

    def grouped(m):
        m = _checkpointed(m) if checkpointing else m
        h = grouped_hidden_states(m, b.input_ids[::3, :P], b.attention_mask[::3, :P], b.response_ids,
                                  b.response_mask, 3)
        return h * b.response_mask[..., None]

    ref, ref_g = _grads(lm.model, lambda m: plain(m).sum(-1))
    got, got_g = _grads(lm.model, lambda m: grouped(m).sum(-1))
    assert torch.allclose(got, ref, atol=1e-4)
    for a, d in zip(ref_g, got_g):
        if a is not None:
            assert torch.allclose(a, d, atol=1e-3, rtol=1e-4)  # gradients of a hidden-state sum: ~1e3


def test_pack_groups_layout_by_hand():
    """Two prompts (one left-padded), G = 2, responses of lengths 2, 1, 0, 3."""
    prompt_ids = torch.tensor([[0, 11, 12], [21, 22, 23]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_ids = torch.tensor([[31, 32, 0], [41, 0, 0], [0, 0, 0], [61, 62, 63]])
    response_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    pk = pack_groups(prompt_ids, prompt_mask, response_ids, response_mask, 2)
    assert pk.input_ids.tolist() == [[11, 12, 31, 32, 41, 0], [21, 22, 23, 61, 62, 63]]
    assert pk.positions.tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert pk.targets.tolist() == [31, 32, 41, 61, 62, 63]
    # state before 31: prompt's last (1); before 32: 31 (2); before 41: prompt's last (1); row 2 starts at 6
    assert pk.source.tolist() == [1, 2, 1, 6 + 2, 6 + 3, 6 + 4]
    m = pk.dense_mask()[0, 0].int().tolist()
    assert m[4] == [1, 1, 0, 0, 1, 0]  # 41 sees the prompt and itself, not its sibling 31, 32
    assert m[3] == [1, 1, 1, 1, 0, 0]  # 32 sees the prompt, 31 and itself
    assert m[5] == [0, 0, 0, 0, 0, 1]  # padding sees only itself (no NaN rows)


def test_heap_trimmed_forward_trims_per_layer_only_with_gradient(monkeypatch):
    from rlmt import runtime
    from rlmt.rollout.logprobs import heap_trimmed_forward

    def state(layer_trim: bool) -> runtime.RuntimeState:
        return runtime.RuntimeState(threads=1, huge_pages=True, huge_pages_active=not layer_trim,
                                    mmap_threshold=0 if layer_trim else 4 << 20, heap_trim=True, layer_trim=layer_trim)

    calls = []
    monkeypatch.setattr(runtime, "release_free_heap", lambda: calls.append(1))
    lm = load_model("tiny-random")
    monkeypatch.setattr(runtime, "_applied", state(layer_trim=True))  # glibc's adaptive mmap threshold
    n_layers = lm.model.config.num_hidden_layers
    ids = torch.tensor([[1, 2, 3]])
    with heap_trimmed_forward(lm.model):
        lm.model(input_ids=ids)
    assert len(calls) == n_layers
    with torch.no_grad(), heap_trimmed_forward(lm.model):
        lm.model(input_ids=ids)
    lm.model(input_ids=ids)  # hooks are gone after the block
    assert len(calls) == n_layers
    # large blocks mapped and huge-page advised: nothing to trim per layer
    monkeypatch.setattr(runtime, "_applied", state(layer_trim=False))
    with heap_trimmed_forward(lm.model):
        lm.model(input_ids=ids)
    assert len(calls) == n_layers
