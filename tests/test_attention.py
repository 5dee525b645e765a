"""Packed-row attention (rlmt.rollout.attention) against SDPA with the dense mask it replaces."""

import pytest
import torch
import torch.nn.functional as F

from rlmt.rollout.attention import PackedLayout, packed_attention, row_layout


def _dense_mask(prompt_len: int, lens: list[int], L: int) -> torch.Tensor:
    """(L, L) bool built position by position from the definition: the prompt is causal; response g sees the
    prompt and its own earlier tokens; padding sees itself."""
    seg = [0] * prompt_len + [g + 1 for g, n in enumerate(lens) for _ in range(n)]
    seg += [-1] * (L - len(seg))
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(i + 1):
            m[i, j] = seg[i] >= 0 and seg[j] >= 0 and (seg[j] == 0 or seg[j] == seg[i])
        m[i, i] = True
    return m


def test_row_layout_by_hand():
    """Prompt of 2, responses of lengths 2 and 0 and 1: positions [x0 x1 | a0 a1 | c0]."""
    r = row_layout(2, [2, 0, 1])
    assert (r.prompt_len, r.lens, tuple(r.mask.shape)) == (2, (2, 0, 1), (3, 1, 2, 4))
    assert r.mask[0, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # a1 sees x, a0, a1
    assert r.mask[2, 0, 0].int().tolist() == [1, 1, 1, 0]  # c0 sees x and itself (slot 1 is padding)
    with pytest.raises(ValueError, match="prompt"):
        row_layout(0, [1])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
def test_packed_attention_equals_dense_mask_sdpa(heads, kv_heads):
    """Values and gradients (q, k, v) equal SDPA over the full row with the dense mask, with GQA, an empty
    response, shorter rows padded to the batch's longest, and a row that is a prompt alone."""
    torch.manual_seed(0)
    rows = [(3, [2, 0, 4]), (5, [1, 1, 1]), (2, [])]
    L = max(p + sum(n) for p, n in rows)
    d = 8
    q = torch.randn(3, heads, L, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, kv_heads, L, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, kv_heads, L, d, dtype=torch.float64, requires_grad=True)
    layout = PackedLayout(tuple(row_layout(p, n) for p, n in rows))
    out = packed_attention(q, k, v, layout, scaling=0.3)
    mask = torch.stack([_dense_mask(p, n, L) for p, n in rows])[:, None]
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask, scale=0.3)
    real = torch.stack([torch.arange(L) < p + sum(n) for p, n in rows])[:, None, :, None]  # (3, 1, L, 1)
    assert torch.allclose(out, ref * real, atol=1e-12)
    assert (out[~real.expand_as(out)] == 0).all()  # padding past a row's end is 0
    w = torch.randn_like(out) * real  # a loss that ignores padding
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_row_layout_mask_grows_with_responses_not_the_row_squared():
    """The point of the layout: attention memory grows with G * T * (P + T), not (P + G * T)^2."""
    P, G, T = 4, 8, 16
    r = row_layout(P, [T] * G)
    L = P + G * T
    assert r.mask.numel() == G * T * (P + T) < L * L // 4


def test_models_on_other_attention_keep_it_and_get_the_dense_mask():
    """An eager model is not switched (its attention would ignore the layout); a model on sdpa is switched
    to rlmt_packed, which gives sdpa's numbers for ordinary calls."""
    from rlmt.rollout.attention import NAME, use_packed_attention
    from rlmt.models import tiny_random_model

    eager, _ = tiny_random_model()
    eager.set_attn_implementation("eager")
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"
    model, _ = tiny_random_model()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    before = model(input_ids=ids, attention_mask=mask).logits
    assert use_packed_attention(model) and model.config._attn_implementation == NAME
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
