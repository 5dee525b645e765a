"""Per-token log-probabilities of given tokens under a causal LM, without full-vocabulary logits for the batch.

The transformer body runs once over (B, L); the output projection and log-softmax run only at the positions
whose next token is a target, in chunks, each chunk recomputed in backward (activation checkpointing) so no
more than ``chunk_tokens x V`` float32 logits live at any moment, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting only real tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (M, H), targets (M,) -> (log p(target) (M,), entropy (M,)) at temperature 1/inv_temperature."""
    logits = F.linear(hidden, weight, bias).float()  # (M, V)
    if inv_temperature != 1.0:
        logits = logits * inv_temperature
    lse = torch.logsumexp(logits, dim=-1)  # (M,)
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return target_logits - lse, entropy


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024,
                   return_entropy: bool = False, position_ids: torch.Tensor | None = None,
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(x_t | x_<t) for every position t with ``target_mask[:, t]`` true.

    Args:
        input_ids: (B, L) token ids, padding anywhere as long as ``attention_mask`` marks it.
        attention_mask: (B, L) 1 for real tokens, or a (B, 1, L, L) boolean mask (packed rows; then pass
            ``position_ids`` too).
        target_mask: (B, L) bool, true where ``input_ids[:, t]`` is scored; position 0 is never a target.
        temperature: logits are divided by it (match the sampler's temperature; 0 is treated as 1).
    Returns:
        (B, L) float32 log-probs, 0 where ``target_mask`` is false; with ``return_entropy`` also (B, L)
        entropies (nats) of the predictive distribution at those positions.
    """
    B, L = input_ids.shape
    body = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
                  use_cache=False).last_hidden_state
    sel = target_mask[:, 1:].bool()  # (B, L-1): the prediction at t-1 scores token t
    h = hidden[:, :-1][sel]  # (M, H)
    targets = input_ids[:, 1:][sel]  # (M,)
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp_parts, ent_parts = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, hc, head.weight, head.bias, tc, inv_t, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(hc, head.weight, head.bias, tc, inv_t)
        lp_parts.append(lp)
        ent_parts.append(ent.detach())
    zeros = hidden.new_zeros((B, L - 1), dtype=torch.float32)
    if lp_parts:
        out = F.pad(zeros.masked_scatter(sel, torch.cat(lp_parts)), (1, 0))
        ent_out = F.pad(zeros.masked_scatter(sel, torch.cat(ent_parts)), (1, 0))
    else:  # nothing to score: a zero that still depends on the parameters, so backward() works
        out = F.pad(zeros, (1, 0)) + 0.0 * hidden.sum()
        ent_out = F.pad(zeros, (1, 0))
    return (out, ent_out) if return_entropy else out
