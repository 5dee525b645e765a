"""Per-token log-probabilities of given tokens under a causal LM, without full-vocabulary logits for the batch.

The transformer body runs once over (B, L); the output projection and log-softmax run only at the positions
whose next token is a target, in chunks, each chunk recomputed in a hand-written backward that accumulates the
output matrix's gradient in one buffer, so no more than ``chunk_tokens x V`` float32 logits live at any moment,
forward or backward. Prompt groups (G responses per prompt, or DPO's chosen/rejected pair) run as one packed
row per prompt, the prompt computed once.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from rlmt.rollout.attention import PackedLayout, row_layout, use_packed_attention
from rlmt.rollout.precision import compute_autocast


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


@contextlib.contextmanager
def heap_trimmed_forward(model: torch.nn.Module):
    """During a CPU forward that keeps activations for backward, return the allocator's free heap to the OS
    after every decoder layer (:func:`rlmt.runtime.release_free_heap`), as ``runtime.layer_trim`` says
    (:func:`rlmt.runtime.per_layer_trim`; by default not when large tensors are already huge-page advised and
    unmapped when freed).

    Each layer frees its transients but keeps its output (and autograd's small blocks) on top of them, so
    glibc's heap grows by several times the kept size per layer; measured on the GRPO benchmark step
    (SmolLM2-135M, checkpointing, one backward per step) this cut peak RSS by ~290 MB at no measurable time
    cost. Not done in backward, where it cost time and saved less. A no-op without gradient or off the CPU.
    """
    from rlmt import runtime

    hooks = []
    if torch.is_grad_enabled() and next(model.parameters()).device.type == "cpu" and runtime.per_layer_trim():
        hooks = [m.register_forward_hook(lambda *_: runtime.release_free_heap())
                 for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")
                 or type(m).__name__.endswith("DecoderLayer")]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


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


def _chunked_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      inv_t: float, chunk: int, entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_chunk_logprobs` over (M, H) in chunks of ``chunk`` rows -> ((M,), (M,))."""
    M = h.shape[0]
    lp, ent = h.new_empty(M, dtype=torch.float32), h.new_zeros(M, dtype=torch.float32)  # allocated up front:
    for i in range(0, M, chunk):  # small blocks kept across chunks would split the freed logits' heap space
        lp[i:i + chunk], ent[i:i + chunk] = _chunk_logprobs(h[i:i + chunk], weight, bias, targets[i:i + chunk],
                                                            inv_t, entropy)
    return lp, ent


class _TargetLogprobs(torch.autograd.Function):
    """log p(target) over the vocabulary, chunk by chunk, with a hand-written backward.

    Forward keeps only h (M, H); backward recomputes each chunk's logits z = (h W^T + b) / T and uses

        d log p(y) / dz = onehot(y) - softmax(z),   so  dh = G W,  dW = G^T h,  db = sum G,
        with G = (g[:, None] / T) * (onehot(y) - softmax(z))  (m, V) per chunk,

    accumulating dW into one (V, H) buffer (``addmm_``) instead of one per chunk plus their sum: for
    SmolLM2 a (V, H) float32 matrix is 113 MB. Entropies are returned without gradient. Not twice
    differentiable (nothing here needs it: TRPO's Fisher products use full logits of their own).

    ``grad_dtype`` (the autocast dtype, or None): the forward's log-probs are always computed in the weights'
    dtype, since they enter ratios and KL terms directly; the backward's recomputed logits and dh then run in
    ``grad_dtype``, as the rest of an autocast backward does, while dW is still summed in float32 by
    ``addmm_`` (a bfloat16 product per chunk would cost a (V, H) cast each). In float32 the head's forward and
    backward took ~1.8-2.1 s of the GRPO benchmark's step (1270 tokens, V = 49152) on a CPU with AMX.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, inv_t: float, chunk: int, entropy: bool,
                grad_dtype: torch.dtype | None = None):
        lp, ent = _chunked_logprobs(h, weight, bias, targets, inv_t, chunk, entropy)
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.inv_t, ctx.chunk, ctx.grad_dtype = inv_t, chunk, grad_dtype
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, _g_ent):
        h, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
        if ctx.grad_dtype is not None and ctx.grad_dtype != weight.dtype:  # an autocast backward
            weight, bias = weight.to(ctx.grad_dtype), bias.to(ctx.grad_dtype) if bias is not None else None
            h = h.to(ctx.grad_dtype)
        for start in range(0, h.shape[0], ctx.chunk):
            hc, tc, gc = h[start:start + ctx.chunk], targets[start:start + ctx.chunk], g_lp[start:start + ctx.chunk]
            z = F.linear(hc, weight, bias).float()  # (m, V)
            if ctx.inv_t != 1.0:
                z.mul_(ctx.inv_t)
            grad_z = torch.softmax(z, dim=-1)  # (m, V) p
            del z
            grad_z.mul_(-gc[:, None])  # -g p
            grad_z[torch.arange(tc.shape[0], device=tc.device), tc] += gc  # + g onehot
            if ctx.inv_t != 1.0:
                grad_z.mul_(ctx.inv_t)
            gw = grad_z.to(weight.dtype)
            if need_h:
                dh[start:start + ctx.chunk] = gw @ weight
            if need_w:
                dw.addmm_(gw.T.to(acc), hc.to(acc))
            if db is not None:
                db += grad_z.sum(0)
        return (dh, dw.to(ctx.saved_tensors[1].dtype) if dw is not None else None,
                db.to(ctx.saved_tensors[2].dtype) if db is not None else None, None, None, None, None, None)


def scored_positions(h: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, inv_t: float,
                      chunk_tokens: int, entropy: bool = True,
                      grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h (M, H) hidden states that predict ``targets`` (M,) -> (log-probs (M,), entropies (M,)), chunked:
    no more than ``chunk_tokens x V`` float32 logits live at once, forward or backward
    (:class:`_TargetLogprobs`). ``entropy=False``: zeros instead of entropies, and less memory per chunk.
    The log-probs are computed in the head's dtype (autocast off); ``grad_dtype`` is the model's autocast
    dtype, in which the backward's products run (:mod:`rlmt.rollout.precision`)."""
    if h.shape[0] == 0:
        return h.sum(-1) * 0.0, h.new_zeros(0)
    weight, bias = head.weight, head.bias
    h = h.to(weight.dtype)  # under autocast (rlmt.rollout.precision) the body's output may be bfloat16
    device = h.device.type
    with torch.autocast(device, enabled=False):  # log-probs in the weights' dtype, even under autocast
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _TargetLogprobs.apply(h, weight, bias, targets, inv_t, chunk_tokens, entropy, grad_dtype)
        with torch.no_grad():
            return _chunked_logprobs(h, weight, bias, targets, inv_t, chunk_tokens, entropy)


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


def grouped_hidden_states(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          response_ids: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                          autocast: torch.dtype | None = None) -> torch.Tensor:
    """(B0*G, T, H) final hidden states that predict each response token; position t holds the state before
    response token t (PPO's values need every position). Each prompt runs once (with gradient) and its KV
    cache is repeated for its G responses; under gradient checkpointing too (the caches are replay-safe, see
    :class:`_RecordLayer`). Log-probs alone use the packed single pass of :func:`grouped_response_logprobs`.

    Shapes as in :func:`grouped_response_logprobs`, except that ``response_mask`` marks every token attended
    to (multi-turn episodes: the environment's tokens too), not only the scored ones.
    """
    T = response_ids.shape[1]
    body = model.get_decoder()
    with _cache_kept_under_checkpointing(model), compute_autocast(model, autocast):
        record = Cache(layer_class_to_replicate=_RecordLayer)
        prompt_h = body(input_ids=prompt_ids, attention_mask=prompt_mask,
                        position_ids=position_ids_from_mask(prompt_mask), use_cache=True,
                        **{cache_kwarg(body): record}).last_hidden_state[:, -1]  # (B0, H)
        prefix = Cache(layers=[_PrefixLayer(layer.keys.repeat_interleave(group_size, 0),
                                            layer.values.repeat_interleave(group_size, 0))
                               for layer in record.layers])  # (N, kv_heads, P, d) per layer
        prompt_h = prompt_h.repeat_interleave(group_size, 0)  # (N, H)
        full_mask = torch.cat([prompt_mask.repeat_interleave(group_size, 0), response_mask.long()], 1)  # (N, P+T)
        start = prompt_mask.sum(-1).repeat_interleave(group_size, 0)[:, None]  # (N, 1)
        resp_h = body(input_ids=response_ids, attention_mask=full_mask,
                      position_ids=start + torch.arange(T, device=response_ids.device), use_cache=True,
                      **{cache_kwarg(body): prefix}).last_hidden_state  # (N, T, H)
    return torch.cat([prompt_h[:, None], resp_h[:, :-1]], 1)


@dataclass
class PackedGroups:
    """One row per prompt group: [prompt, y_1, ..., y_G], real tokens only, right-padded to the longest row.

    ``mask`` lets each response attend to its prompt and its own earlier tokens (not to its siblings), so
    every response sees exactly the context it would see as its own sequence, and the prompt is computed once.
    """

    input_ids: torch.Tensor  # (B0, L)
    segments: torch.Tensor  # (B0, L): 0 the prompt, g the g-th response (1-based), -1 padding
    positions: torch.Tensor  # (B0, L): the prompt from 0; each response continues from the prompt's length
    source: torch.Tensor  # (M,) flat index into (B0 * L) of the state predicting each scored response token
    targets: torch.Tensor  # (M,) those tokens, in the row-major order of ``response_mask``
    layout: PackedLayout  # the same structure for :mod:`rlmt.rollout.attention` (no (L, L) mask)

    def dense_mask(self) -> torch.Tensor:
        """(B0, 1, L, L) bool, True = may attend: the mask for attention implementations other than
        ``rlmt_packed``. Padding attends only to itself (no NaN rows)."""
        L = self.segments.shape[1]
        q, k = self.segments[:, :, None], self.segments[:, None, :]  # (B0, L, 1), (B0, 1, L)
        idx = torch.arange(L, device=q.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        mask = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
        return (mask | torch.eye(L, dtype=torch.bool, device=q.device)[None])[:, None]


def pack_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                response_mask: torch.Tensor, group_size: int) -> PackedGroups:
    """Lay out B0 prompts and their G responses each as one packed row (see :class:`PackedGroups`).

    Args as in :func:`grouped_response_logprobs`. A response keeps its tokens up to its last masked one.
    """
    B0, T = prompt_ids.shape[0], response_ids.shape[1]
    dev = response_ids.device
    last = torch.where(response_mask.any(-1), T - response_mask.flip(-1).int().argmax(-1), 0).tolist()
    rows, segs, poss, sources, layouts = [], [], [], [], []
    for b in range(B0):
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        p = prompt.shape[0]
        ids, seg, pos, offset = [prompt], [torch.zeros(p, dtype=torch.long, device=dev)], \
            [torch.arange(p, device=dev)], p
        for g in range(group_size):
            j = b * group_size + g
            t = last[j]
            ids.append(response_ids[j, :t])
            seg.append(torch.full((t,), g + 1, dtype=torch.long, device=dev))
            pos.append(torch.arange(p, p + t, device=dev))
            # the state before token k: the prompt's last for k = 0, else the response's own token k - 1
            src = torch.cat([torch.tensor([p - 1], device=dev),
                             torch.arange(offset, offset + max(t - 1, 0), device=dev)])[:t]
            sources.append((b, src[response_mask[j, :t].bool()]))
            offset += t
        layouts.append(row_layout(p, last[b * group_size:(b + 1) * group_size], dev))
        rows.append(torch.cat(ids))
        segs.append(torch.cat(seg))
        poss.append(torch.cat(pos))
    L = max(r.shape[0] for r in rows)
    input_ids = torch.zeros((B0, L), dtype=torch.long, device=dev)
    seg_ids = torch.full((B0, L), -1, dtype=torch.long, device=dev)  # -1: padding
    positions = torch.zeros((B0, L), dtype=torch.long, device=dev)
    for b, (r, sg, ps) in enumerate(zip(rows, segs, poss)):
        input_ids[b, :r.shape[0]], seg_ids[b, :r.shape[0]], positions[b, :r.shape[0]] = r, sg, ps
    source = torch.cat([b * L + src for b, src in sources]) if sources else torch.zeros(0, dtype=torch.long)
    return PackedGroups(input_ids, seg_ids, positions, source, response_ids[response_mask.bool()],
                        PackedLayout(tuple(layouts)))


def grouped_response_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                              response_ids: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                              temperature: float = 1.0, chunk_tokens: int = 64,
                              return_entropy: bool = False, autocast: torch.dtype | None = None,
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of G responses per prompt, running each prompt through the model once.

    Each prompt group is one packed row (:func:`pack_groups`): the prompt's tokens once, then its G
    responses, each attending to the prompt and to itself only. The same numbers and the same gradient as G
    full forward passes, at (P + sum of response lengths) instead of G * (P + T) tokens of compute: no
    padding inside a row, and no padding to the longest response. One pass through the layers, so gradient
    checkpointing applies as usual, and each layer's gradient is complete when backward leaves that layer
    (``optim.step_in_backward`` frees it there).

    Args:
        prompt_ids, prompt_mask: (B0, P) left-padded prompts.
        response_ids, response_mask: (B0*G, T) right-padded responses; rows [p*G, (p+1)*G) answer prompt p.
        autocast: the body's autocast dtype (``model.autocast``; None: the weights' dtype); the log-probs
            are computed in float32 either way (:func:`scored_positions`).
    Returns:
        (B0*G, T) float32 log-probs (0 off the mask); with ``return_entropy`` also (B0*G, T) entropies.
    """
    N, T = response_ids.shape
    packed = pack_groups(prompt_ids, prompt_mask, response_ids, response_mask, group_size)
    if use_packed_attention(model):  # two SDPA calls a row, no (L, L) mask (rlmt.rollout.attention)
        # an all-ones 2-D mask: transformers then neither builds a causal mask nor infers packing from positions
        attention = {"attention_mask": torch.ones_like(packed.input_ids), "rlmt_layout": packed.layout}
    else:
        attention = {"attention_mask": packed.dense_mask()}
    with heap_trimmed_forward(model), compute_autocast(model, autocast):
        hidden = model.get_decoder()(input_ids=packed.input_ids, position_ids=packed.positions, use_cache=False,
                                     **attention).last_hidden_state  # (B0, L, H)
    h = hidden.reshape(-1, hidden.shape[-1])[packed.source]  # (M, H)
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp, ent = scored_positions(h, packed.targets, model.get_output_embeddings(), inv_t, chunk_tokens,
                                return_entropy, autocast)
    sel = response_mask.bool()
    zeros = hidden.new_zeros((N, T), dtype=torch.float32)
    out = zeros.masked_scatter(sel, lp) if sel.any() else zeros + 0.0 * hidden.sum()
    return (out, zeros.masked_scatter(sel, ent)) if return_entropy else out


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 64,
                   return_entropy: bool = False, position_ids: torch.Tensor | None = None,
                   autocast: torch.dtype | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(x_t | x_<t) for every position t with ``target_mask[:, t]`` true.

    Args:
        input_ids: (B, L) token ids, padding anywhere as long as ``attention_mask`` marks it.
        attention_mask: (B, L) 1 for real tokens, or a (B, 1, L, L) boolean mask (packed rows; then pass
            ``position_ids`` too).
        target_mask: (B, L) bool, true where ``input_ids[:, t]`` is scored; position 0 is never a target.
        temperature: logits are divided by it (match the sampler's temperature; 0 is treated as 1).
        autocast: the body's autocast dtype, as in :func:`grouped_response_logprobs`.
    Returns:
        (B, L) float32 log-probs, 0 where ``target_mask`` is false; with ``return_entropy`` also (B, L)
        entropies (nats) of the predictive distribution at those positions.
    """
    B, L = input_ids.shape
    body = model.get_decoder()
    head = model.get_output_embeddings()
    with heap_trimmed_forward(model), compute_autocast(model, autocast):
        hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
                      use_cache=False).last_hidden_state
    sel = target_mask[:, 1:].bool()  # (B, L-1): the prediction at t-1 scores token t
    h = hidden[:, :-1][sel]  # (M, H)
    targets = input_ids[:, 1:][sel]  # (M,)
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp, ent = scored_positions(h, targets, head, inv_t, chunk_tokens, return_entropy, autocast)
    zeros = hidden.new_zeros((B, L - 1), dtype=torch.float32)
    if sel.any():
        out = F.pad(zeros.masked_scatter(sel, lp), (1, 0))
        ent_out = F.pad(zeros.masked_scatter(sel, ent), (1, 0))
    else:  # nothing to score: a zero that still depends on the parameters, so backward() works
        out = F.pad(zeros, (1, 0)) + 0.0 * hidden.sum()
        ent_out = F.pad(zeros, (1, 0))
    return (out, ent_out) if return_entropy else out
