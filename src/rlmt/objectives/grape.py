"""GRAPE step 4: confidence-weighted combination of per-item rubric scores into one reward per response.

Weights inversely proportional to each estimate's variance give the minimum-variance combination (the seed
paper's Lemma 8.1); the critic's confidence stands in for inverse variance, averaged per item over the
responses being compared so that every response in a group is judged with the same item weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


Groups = Tensor | Sequence[Sequence[int]] | None


def _group_ids(groups: Groups, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Normalise ``groups`` to (ids (N,) long in [0, K), K)."""
    if groups is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    if isinstance(groups, Tensor):
        if groups.shape != (n,):
            raise ValueError(f"group ids must have shape ({n},), got {tuple(groups.shape)}")
        uniq, ids = torch.unique(groups, sorted=True, return_inverse=True)
        return ids.to(device), int(uniq.numel())
    ids = torch.full((n,), -1, dtype=torch.long)
    for k, members in enumerate(groups):
        for i in members:
            if not 0 <= i < n or ids[i] != -1:
                raise ValueError(f"response {i} is out of range or in more than one group")
            ids[i] = k
    if (ids < 0).any():
        raise ValueError(f"responses {torch.nonzero(ids < 0).flatten().tolist()} are in no group")
    return ids.to(device), len(groups)


@torch.no_grad()
def grape_aggregate(scores: Tensor, confidences: Tensor, weights: Tensor,
                    groups: Groups = None) -> tuple[Tensor, Tensor]:
    """Combine item scores into rewards: scores, confidences (N, J), weights (J,) -> R (N,), phi (K, J).

    An entry (i, j) is present when both s_ij and c_ij are finite (NaN marks a missing score: the item did
    not apply, or the critic's output did not parse). Responses are compared within groups (K of them):
    ``groups`` is None (all N together), a (N,) tensor of group ids (group k = the k-th smallest id), or a
    list of index lists that partitions range(N). For a response i in group g(i):

        phi_gj = mean of c_ij over the responses i in group g where (i, j) is present  (NaN if none)
        R_i    = sum_j w_j phi_gj s_ij / sum_j w_j phi_gj,   sums over the items j present for response i

    An item with phi = 0 (zero confidence everywhere) contributes nothing. A response whose denominator is
    0 (no present item, or only items with phi = 0) gets R_i = NaN: it is missing, never scored 0.
    """
    if scores.ndim != 2 or confidences.shape != scores.shape or weights.shape != scores.shape[1:]:
        raise ValueError(f"expected scores, confidences (N, J) and weights (J,), got {tuple(scores.shape)}, "
                         f"{tuple(confidences.shape)}, {tuple(weights.shape)}")
    s, c = scores.to(torch.float64), confidences.to(torch.float64)
    w = weights.to(s.device, torch.float64)
    present = torch.isfinite(s) & torch.isfinite(c)  # (N, J)
    s0 = torch.where(present, s, torch.zeros_like(s))
    c0 = torch.where(present, c, torch.zeros_like(c))
    ids, k = _group_ids(groups, s.shape[0], s.device)
    onehot = torch.nn.functional.one_hot(ids, k).to(torch.float64).T  # (K, N)
    conf_sum = onehot @ c0  # (K, J)
    count = onehot @ present.to(torch.float64)  # (K, J)
    phi = torch.where(count > 0, conf_sum / count.clamp_min(1), torch.full_like(conf_sum, torch.nan))
    item_w = w * torch.nan_to_num(phi, nan=0.0)[ids]  # (N, J): w_j * phi_{g(i) j}
    item_w = torch.where(present, item_w, torch.zeros_like(item_w))
    num = (item_w * s0).sum(-1)
    den = item_w.sum(-1)
    reward = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                         torch.full_like(den, torch.nan))
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    return reward.to(out_dtype), phi.to(out_dtype)
