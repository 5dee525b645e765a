"""Masked statistics and the reduction of a per-token loss to the scalar that is backpropagated.

Shapes: per-token tensors are (B, T); ``mask`` (B, T) is bool or float, non-zero on response tokens. Masked
positions never reach the result (they are replaced by 0 before any arithmetic, so padding may hold -inf or
NaN), and an all-masked input reduces to a finite 0 whose gradient is 0.

Why a global normalizer makes the loss split-invariant
------------------------------------------------------
Every mode is ``loss = (sum over units u of c_u) / N``, where a unit is a token ("token_mean"), a whole
sequence ("seq_mean": c_u is that sequence's mean token loss; "seq_sum": its summed token loss) or a token
again ("constant"), and N counts the units of the *whole* batch (or is a constant). A micro-batch k holds a
disjoint subset S_k of the units; sequences are never split across micro-batches. With the same N in
every micro-batch, ``sum_k loss_k = sum_k sum_{u in S_k} c_u / N = loss_full`` exactly, and because the
gradient is linear, ``sum_k grad loss_k = grad loss_full``: accumulating (summing) micro-batch gradients
gives the full-batch gradient whatever the split. With a *local* normalizer N_k each micro-batch is
over-weighted by N / N_k; e.g. a micro-batch of short responses gives its tokens more weight than the same
tokens in a long one (the bug of torchtune#2307). Across W processes the same argument holds with the ranks'
micro-batches as more disjoint subsets: each rank uses ``normalizer = N_global`` (the sum of
:func:`loss_normalizer` over all micro-batches and ranks, via ``all_reduce``) and the rank gradients are
*summed* (:func:`rlmt.parallel.all_reduce_gradients`), which is the gradient of one process holding the whole
batch. (A framework that *averages* over ranks, as DDP's wrapper does, needs ``N_global / W`` instead.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Normalizer = float | int | Tensor


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` with masked positions set to exactly 0 (even where x is inf or NaN)."""
    m = mask.to(x.dtype)
    return torch.where(m != 0, x * m, torch.zeros_like(x))


def _safe_div(num: Tensor, den: Normalizer) -> Tensor:
    """``num / den``, with a zero denominator read as 1 (its numerator is then a sum over nothing: 0)."""
    den_t = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den_t != 0, den_t, torch.ones_like(den_t))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask)`` over ``dim`` (all elements when None). x, mask: same shape."""
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim``; 0 where the mask is empty. x, mask: same shape."""
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return _safe_div(masked_sum(x, mask, dim), count)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = False) -> Tensor:
    """Variance of the masked elements: ``masked_mean((x - mu)^2)``, times ``n / (n - 1)`` if ``unbiased``.

    ``mask`` must be 0/1 here (n counts its ones). With ``unbiased`` and n < 2 the variance is 0 rather than
    NaN: one sample carries no spread.
    """
    mu = masked_mean(x, mask, dim)
    mu = mu if dim is None else mu.unsqueeze(dim)
    var = masked_mean((x - mu) ** 2, mask, dim)
    if unbiased:
        m = mask.to(x.dtype)
        n = m.sum() if dim is None else m.sum(dim)
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1), torch.zeros_like(var))
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mu) / sqrt(var + eps)`` over the masked elements (population variance); masked positions -> 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes). x, mask: (B, T) -> (B, T).
    """
    mu = masked_mean(x, mask)
    out = (x - mu) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mu
    return _masked(out, mask)


def token_mean(per_token_loss: Tensor, mask: Tensor, normalizer: Normalizer | None = None) -> Tensor:
    """``sum_{b,t} m_bt l_bt / N``; N = number of response tokens in this batch, or the global count given."""
    n = mask.to(per_token_loss.dtype).sum() if normalizer is None else normalizer
    return _safe_div(masked_sum(per_token_loss, mask), n)


def _seq_lengths(mask: Tensor) -> Tensor:
    return (mask != 0).sum(-1)


def seq_mean(per_token_loss: Tensor, mask: Tensor, normalizer: Normalizer | None = None) -> Tensor:
    """``sum_b [sum_t m_bt l_bt / n_b] / S``: each sequence's token mean, averaged over sequences.

    n_b = response tokens of sequence b; S = sequences with n_b > 0 in this batch, or the global count given.
    """
    lengths = _seq_lengths(mask)
    per_seq = _safe_div(masked_sum(per_token_loss, mask, dim=-1), lengths)
    s = (lengths > 0).sum() if normalizer is None else normalizer
    return _safe_div(per_seq.sum(), s)


def seq_sum(per_token_loss: Tensor, mask: Tensor, normalizer: Normalizer | None = None) -> Tensor:
    """``sum_b [sum_t m_bt l_bt] / S``: each sequence's summed token loss (REINFORCE), averaged over sequences.

    S = sequences with a response token in this batch, or the global count given.
    """
    s = (_seq_lengths(mask) > 0).sum() if normalizer is None else normalizer
    return _safe_div(masked_sum(per_token_loss, mask), s)


def constant(per_token_loss: Tensor, mask: Tensor, normalizer: Normalizer | None = None) -> Tensor:
    """``sum_{b,t} m_bt l_bt / C`` with a constant C (Dr. GRPO: C = max_len * num_seqs).

    Default C = B * T of this tensor, which depends on the padding; pass a fixed C (e.g. the generation
    budget max_new_tokens times the global number of sequences) for split invariance.
    """
    c = per_token_loss.shape[0] * per_token_loss.shape[-1] if normalizer is None else normalizer
    return _safe_div(masked_sum(per_token_loss, mask), c)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, Normalizer | None], Tensor]] = {
    "token_mean": token_mean,
    "seq_mean": seq_mean,
    "seq_sum": seq_sum,
    "constant": constant,
}


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, mode: str,
                   normalizer: Normalizer | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar by ``mode`` (a key of :data:`AGGREGATIONS`).

    ``normalizer`` is the global unit count (see the module docstring and :func:`loss_normalizer`);
    None uses this batch's own count, which is correct only when the batch is the whole batch.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](per_token_loss, mask, normalizer)


def loss_normalizer(mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """The units this (B, T) mask contributes to ``mode``'s normalizer: response tokens ("token_mean"),
    sequences with a response token ("seq_mean", "seq_sum"), or B * max_len ("constant"; max_len defaults to
    T). Sum it over micro-batches (and ``all_reduce`` it over ranks) to get the global ``normalizer``.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {sorted(AGGREGATIONS)}")
    if mode == "token_mean":
        return (mask != 0).sum().float()
    if mode == "constant":
        return torch.tensor(float(mask.shape[0] * (mask.shape[-1] if max_len is None else max_len)))
    return (_seq_lengths(mask) > 0).sum().float()
