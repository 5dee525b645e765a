"""Per-token KL estimators and the entropy of a categorical distribution given by logits.

With samples y_t ~ pi and log-ratio ``d_t = log pi_ref(y_t) - log pi(y_t)`` (Schulman, "Approximating KL
divergence", 2020), both estimators below are unbiased for KL(pi || pi_ref):

    k1 = -d                     (low variance only when pi ~ pi_ref; can be negative)
    k3 = exp(d) - d - 1 >= 0     (non-negative since e^x >= 1 + x; lower variance)

Shapes: any, elementwise; typically (B, T).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlmt.objectives.aggregate import masked_mean


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """``k1_t = log pi(y_t) - log pi_ref(y_t)``, elementwise."""
    return logp - logp_ref


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """``k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1``, elementwise, >= 0."""
    d = logp_ref - logp
    return torch.expm1(d) - d


@torch.no_grad()
def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """PPO's diagnostic: KL(pi_old || pi) estimated by k3 on tokens sampled from pi_old (CleanRL's
    ``((ratio - 1) - log ratio).mean()``), averaged over the mask. (B, T) x 3 -> scalar, detached.
    """
    m = mask != 0
    logratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return masked_mean(torch.expm1(logratio) - logratio, mask)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits) at each position: (..., V) -> (...), in float32 at least.

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,   p = softmax(z)

    Stable for any logit scale (no log of a tiny probability is taken). ``chunk_size`` bounds how many
    positions are upcast at once, so a (B, T, V) half-precision tensor never becomes a full float32 copy.
    Differentiable (usable as an entropy bonus).
    """
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    step = flat.shape[0] if chunk_size is None else max(1, chunk_size)
    parts = []
    for start in range(0, flat.shape[0], step):
        z = flat[start:start + step]
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        # where: a -inf logit (a banned token) has p = 0 and must add 0, not 0 * -inf = NaN
        parts.append(lse - (p * torch.where(torch.isfinite(z), z, torch.zeros_like(z))).sum(-1))
    if not parts:
        return flat.new_zeros(lead, dtype=torch.promote_types(flat.dtype, torch.float32))
    return torch.cat(parts).reshape(lead)
