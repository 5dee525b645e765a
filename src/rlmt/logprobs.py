"""Per-token log-probabilities of given tokens under a causal LM, without full-vocabulary logits for the batch.

The transformer body runs once over (B, L); the output projection and log-softmax run only at the positions
whose next token is a target, in chunks, each chunk recomputed in backward (activation checkpointing) so no
more than ``chunk_tokens x V`` float32 logits live at any moment, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` recomputes activations in backward (transformers then refuses a KV cache)."""
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting only real tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, inv_temperature: float,
                    entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (M, H), targets (M,) -> (log p(target) (M,), entropy (M,)) at temperature 1/inv_temperature.

    With ``entropy=False`` the entropy is zeros and the two extra (M, V) tensors it needs are never made."""
    logits = F.linear(hidden, weight, bias).float()  # (M, V)
    if inv_temperature != 1.0:
        logits = logits * inv_temperature
    lse = torch.logsumexp(logits, dim=-1)  # (M,)
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return target_logits - lse, lse.detach().new_zeros(lse.shape)
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return target_logits - lse, entropy


def _scored_positions(h: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, inv_t: float,
                      chunk_tokens: int, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """h (M, H) hidden states that predict ``targets`` (M,) -> (log-probs (M,), entropies (M,)), chunked.
    ``entropy=False``: zeros instead of entropies, and less memory per chunk."""
    lp_parts, ent_parts = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, hc, head.weight, head.bias, tc, inv_t, entropy,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(hc, head.weight, head.bias, tc, inv_t, entropy)
        lp_parts.append(lp)
        ent_parts.append(ent.detach())
    if not lp_parts:
        return h.sum(-1) * 0.0, h.new_zeros(0)
    return torch.cat(lp_parts), torch.cat(ent_parts)


def grouped_hidden_states(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          response_ids: torch.Tensor, response_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B0*G, T, H) final hidden states that predict each response token; position t holds the state before
    response token t. Each prompt runs once (with gradient) and its KV cache is repeated for its G responses.

    Shapes as in :func:`grouped_response_logprobs`.
    """
    from transformers import DynamicCache

    T = response_ids.shape[1]
    body = model.get_decoder()
    cache = DynamicCache()
    prompt_h = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                    past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # (B0, H)
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
        prompt_h = prompt_h.repeat_interleave(group_size, 0)
    full_mask = torch.cat([prompt_mask.repeat_interleave(group_size, 0), response_mask.long()], 1)  # (N, P+T)
    positions = prompt_mask.sum(-1).repeat_interleave(group_size, 0)[:, None] + torch.arange(T, device=response_ids.device)
    resp_h = body(input_ids=response_ids, attention_mask=full_mask, position_ids=positions,
                  past_key_values=cache, use_cache=True).last_hidden_state  # (N, T, H)
    return torch.cat([prompt_h[:, None], resp_h[:, :-1]], 1)


def grouped_response_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                              response_ids: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                              temperature: float = 1.0, chunk_tokens: int = 64,
                              return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of G responses per prompt, running each prompt through the model once.

    The prompt's keys and values are computed once per prompt (with gradient), repeated G times, and the
    responses attend to them: the same numbers and the same gradient as G full forward passes, at
    (P + G*T) instead of G*(P + T) tokens of compute. The gradient through the shared prompt is exact:
    autograd sums the G responses' contributions through the repeat.

    Args:
        prompt_ids, prompt_mask: (B0, P) left-padded prompts.
        response_ids, response_mask: (B0*G, T) right-padded responses; rows [p*G, (p+1)*G) answer prompt p.
    Returns:
        (B0*G, T) float32 log-probs (0 off the mask); with ``return_entropy`` also (B0*G, T) entropies.
    """
    N, T = response_ids.shape
    head = model.get_output_embeddings()
    h = grouped_hidden_states(model, prompt_ids, prompt_mask, response_ids, response_mask, group_size)
    sel = response_mask.bool()
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp, ent = _scored_positions(h[sel], response_ids[sel], head, inv_t, chunk_tokens, return_entropy)
    zeros = h.new_zeros((N, T), dtype=torch.float32)
    out = zeros.masked_scatter(sel, lp) if sel.any() else zeros + 0.0 * h.sum()
    return (out, zeros.masked_scatter(sel, ent)) if return_entropy else out


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 64,
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
    lp, ent = _scored_positions(h, targets, head, inv_t, chunk_tokens, return_entropy)
    zeros = hidden.new_zeros((B, L - 1), dtype=torch.float32)
    if sel.any():
        out = F.pad(zeros.masked_scatter(sel, lp), (1, 0))
        ent_out = F.pad(zeros.masked_scatter(sel, ent), (1, 0))
    else:  # nothing to score: a zero that still depends on the parameters, so backward() works
        out = F.pad(zeros, (1, 0)) + 0.0 * hidden.sum()
        ent_out = F.pad(zeros, (1, 0))
    return (out, ent_out) if return_entropy else out
