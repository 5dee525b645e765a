"""Per-token log-probabilities of given tokens under a causal LM, without full-vocabulary logits for the batch.

The transformer body runs once over (B, L); the output projection and log-softmax run only at the positions
whose next token is a target, in chunks, each chunk recomputed in backward (activation checkpointing) so no
more than ``chunk_tokens x V`` float32 logits live at any moment, forward or backward.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicLayer


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` recomputes activations in backward (transformers then refuses a KV cache)."""
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def cache_kwarg(module: torch.nn.Module) -> str:
    """The name ``module.forward`` takes a KV cache under: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values`` (deprecated there, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_survives_checkpointing() -> bool:
    """Whether this transformers lets a checkpointed decoder layer keep a (replay-safe) cache; older ones drop
    it, and callers then score full sequences instead of sharing the prompt's KV."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


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


class _RecordLayer(DynamicLayer):
    """Prompt pass: ``update`` stores this layer's keys/values (overwriting, not appending) and returns them.

    The prompt pass starts from an empty cache, so storing equals appending; when gradient checkpointing
    replays the layer in backward, the replay stores again instead of growing the cache."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.device, self.is_initialized = key_states.device, True
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """Response pass: a fixed prefix (the prompt's keys/values, repeated per response); ``update`` returns
    cat(prefix, new) and stores nothing, so a checkpoint replay sees exactly what the first pass saw."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


@contextlib.contextmanager
def _cache_kept_under_checkpointing(model: torch.nn.Module):
    """Let checkpointed decoder layers keep the cache argument (transformers drops it by default because its
    own caches append on replay; ours above are replay-safe). Restores the layers' flags on exit."""
    layers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    before = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            if b is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = b


def length_buckets(lengths: torch.Tensor, bucket_rows: int) -> list[torch.Tensor]:
    """Row indices grouped into buckets of ``bucket_rows`` rows of similar length (longest first), so each
    bucket can be trimmed to its own longest row; ``bucket_rows <= 0`` keeps one bucket in row order."""
    n = lengths.shape[0]
    if bucket_rows <= 0 or bucket_rows >= n:
        return [torch.arange(n, device=lengths.device)]
    order = torch.argsort(lengths, descending=True, stable=True)
    return list(order.split(bucket_rows))


def grouped_hidden_states(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          response_ids: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                          bucket_rows: int = 0) -> torch.Tensor:
    """(B0*G, T, H) final hidden states that predict each response token; position t holds the state before
    response token t. Each prompt runs once (with gradient) and its KV cache is repeated for its G responses.

    Works under gradient checkpointing too (the caches are replay-safe, see :class:`_RecordLayer`). With
    ``bucket_rows > 0`` the responses run in buckets of that many rows of similar length, each trimmed to its
    longest response (less padding computed); positions past a bucket's longest response hold zeros.

    Shapes as in :func:`grouped_response_logprobs`.
    """
    N, T = response_ids.shape
    body = model.get_decoder()
    with _cache_kept_under_checkpointing(model):
        record = Cache(layer_class_to_replicate=_RecordLayer)
        prompt_h = body(input_ids=prompt_ids, attention_mask=prompt_mask,
                        position_ids=position_ids_from_mask(prompt_mask), use_cache=True,
                        **{cache_kwarg(body): record}).last_hidden_state[:, -1]  # (B0, H)
        prefix_k = [layer.keys.repeat_interleave(group_size, 0) for layer in record.layers]  # (N, kv, P, d)
        prefix_v = [layer.values.repeat_interleave(group_size, 0) for layer in record.layers]
        prompt_h = prompt_h.repeat_interleave(group_size, 0)  # (N, H)
        p_mask = prompt_mask.repeat_interleave(group_size, 0)  # (N, P)
        start = prompt_mask.sum(-1).repeat_interleave(group_size, 0)[:, None]  # (N, 1) first response position
        # last real position + 1 per row (masks may have holes; padding is only trimmed past the last one)
        lengths = torch.where(response_mask.any(-1), T - response_mask.flip(-1).int().argmax(-1), 0)
        parts, rows_done = [], []
        for rows in length_buckets(lengths, bucket_rows):
            t = max(1, int(lengths[rows].max())) if bucket_rows > 0 else T
            cache = Cache(layers=[_PrefixLayer(k[rows], v[rows]) for k, v in zip(prefix_k, prefix_v)])
            full_mask = torch.cat([p_mask[rows], response_mask[rows, :t].long()], 1)  # (n, P+t)
            positions = start[rows] + torch.arange(t, device=response_ids.device)
            resp_h = body(input_ids=response_ids[rows, :t], attention_mask=full_mask, position_ids=positions,
                          use_cache=True, **{cache_kwarg(body): cache}).last_hidden_state  # (n, t, H)
            h = torch.cat([prompt_h[rows, None], resp_h[:, :-1]], 1)  # (n, t, H)
            parts.append(F.pad(h, (0, 0, 0, T - t)) if t < T else h)
            rows_done.append(rows)
    if len(parts) == 1:
        return parts[0]
    order = torch.cat(rows_done)
    return torch.cat(parts)[torch.argsort(order)]


def grouped_response_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                              response_ids: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                              temperature: float = 1.0, chunk_tokens: int = 64,
                              return_entropy: bool = False, bucket_rows: int = 0,
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of G responses per prompt, running each prompt through the model once.

    The prompt's keys and values are computed once per prompt (with gradient), repeated G times, and the
    responses attend to them: the same numbers and the same gradient as G full forward passes, at
    (P + G*T) instead of G*(P + T) tokens of compute. The gradient through the shared prompt is exact:
    autograd sums the G responses' contributions through the repeat.

    Args:
        prompt_ids, prompt_mask: (B0, P) left-padded prompts.
        response_ids, response_mask: (B0*G, T) right-padded responses; rows [p*G, (p+1)*G) answer prompt p.
        bucket_rows: run the responses in length buckets of this many rows (0: one padded batch).
    Returns:
        (B0*G, T) float32 log-probs (0 off the mask); with ``return_entropy`` also (B0*G, T) entropies.
    """
    N, T = response_ids.shape
    head = model.get_output_embeddings()
    h = grouped_hidden_states(model, prompt_ids, prompt_mask, response_ids, response_mask, group_size, bucket_rows)
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
