"""Attention over packed prompt groups without a dense (L, L) mask.

A packed row (:func:`rlmt.rollout.logprobs.pack_groups`) holds a prompt once, then its G responses:
``[x | y_1 | ... | y_G]``. The prompt attends causally to itself. Response y_j attends to the prompt and,
causally, to itself. It never attends to its siblings. With a dense mask, SDPA computes all L^2 query-key
pairs (L = P + sum_j |y_j|) and the mask alone is L^2 bytes. For G = 16 responses of 1024 tokens after a
256-token prompt that is a 277 MB mask per row and ~13x the pairs needed. Here each row costs two SDPA calls:

    prompt:     softmax(q_x k_x^T / sqrt(d) + causal) v_x                      (1, H, P, d)
    responses:  softmax(q_y [k_x; k_y]^T / sqrt(d) + M) [v_x; v_y]             (G, H, T, d)

with the G responses padded to the row's longest, T, and the prompt's keys repeated G times. That is
P^2 + G T (P + T) pairs instead of L^2.

The function is registered with transformers under the name ``rlmt_packed``. A model set to it behaves
exactly like ``sdpa`` unless a forward call passes ``rlmt_layout=`` (a :class:`PackedLayout`). Because the
layout travels as a forward keyword, gradient checkpointing replays the same attention in backward.
:func:`use_packed_attention` switches a model to it when the model uses ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "rlmt_packed"


@dataclass(frozen=True)
class RowLayout:
    """One packed row ``[prompt (prompt_len) | y_1 | ... | y_G]``: the response lengths, and ``mask``
    (G, 1, T, P + T) bool (may attend) for the responses padded to the longest, T, each with the prompt's keys
    first."""

    prompt_len: int
    lens: tuple[int, ...]
    mask: torch.Tensor


@dataclass(frozen=True)
class PackedLayout:
    """The rows of a packed batch, in order (what a forward call passes as ``rlmt_layout=``)."""

    rows: tuple[RowLayout, ...]


def row_layout(prompt_len: int, response_lens: list[int], device: torch.device | None = None) -> RowLayout:
    """The layout of a row ``[prompt (prompt_len) | y_1 | ... | y_G]`` with responses of the given lengths."""
    if prompt_len < 1:
        raise ValueError("a packed row needs a prompt of at least one token")
    P, G, T = prompt_len, len(response_lens), max(max(response_lens, default=0), 1)
    t = torch.arange(T, device=device)
    valid = t[None, :] < torch.tensor(response_lens, dtype=torch.long, device=device)[:, None]  # (G, T)
    # response slot i sees response slot j <= i when j is real; a padded slot (output dropped) sees the same
    resp_keys = (t[None, :, None] >= t[None, None, :]) & valid[:, None, :]  # (G, T, T)
    mask = torch.cat([torch.ones(G, T, P, dtype=torch.bool, device=device), resp_keys], -1)[:, None]
    return RowLayout(P, tuple(int(n) for n in response_lens), mask)


class _GatherRows(torch.autograd.Function):
    """Per packed row b of x (B, h, L, d): its prompt (1, h, P, d) and its responses (G, h, [P +] T, d), response g
    zero-padded to T and, with ``prefix``, preceded by the prompt (the keys and values each response attends to).

    One Function for the whole batch: the backward writes every row's gradient into one (B, h, L, d) buffer,
    the prompt's G + 1 copies summed, instead of autograd's full-size zero-and-add per row and per slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: "PackedLayout", prefix: bool):
        outs = []
        for b, row in enumerate(layout.rows):
            P, lens, T = row.prompt_len, row.lens, row.mask.shape[2]
            outs.append(x[b:b + 1, :, :P].clone())
            pre = P if prefix else 0
            y = x.new_zeros((len(lens), x.shape[1], pre + T, x.shape[3]))
            if pre:
                y[:, :, :P] = x[b:b + 1, :, :P]
            off = P
            for g, m in enumerate(lens):
                y[g, :, pre:pre + m] = x[b, :, off:off + m]
                off += m
            outs.append(y)
        ctx.layout, ctx.prefix, ctx.shape = layout, prefix, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        dx = grads[0].new_zeros(ctx.shape)
        for b, row in enumerate(ctx.layout.rows):
            P, lens = row.prompt_len, row.lens
            g_x, g_y = grads[2 * b], grads[2 * b + 1]
            pre = P if ctx.prefix else 0
            dx[b, :, :P] = g_x[0] + g_y[:, :, :P].sum(0) if pre else g_x[0]
            off = P
            for g, m in enumerate(lens):
                dx[b, :, off:off + m] = g_y[g, :, pre:pre + m]
                off += m
        return dx, None, None


class _ScatterRows(torch.autograd.Function):
    """The inverse layout: per row b its prompt's outputs (1, H, P, d) and its responses' (G, H, T, d) -> one
    (B, H, L, d) tensor (a transposed view of a contiguous (B, L, H, d) buffer, the layout transformers' attention
    functions return), zero past each row's end."""

    @staticmethod
    def forward(ctx, layout: "PackedLayout", L: int, *parts: torch.Tensor) -> torch.Tensor:
        o_x0 = parts[0]
        B, H, d = len(layout.rows), o_x0.shape[1], o_x0.shape[3]
        out = o_x0.new_zeros((B, L, H, d)).transpose(1, 2)  # (B, H, L, d) view
        for b, row in enumerate(layout.rows):
            P = row.prompt_len
            out[b, :, :P] = parts[2 * b][0]
            off = P
            for g, m in enumerate(row.lens):
                out[b, :, off:off + m] = parts[2 * b + 1][g, :, :m]
                off += m
        ctx.layout, ctx.T = layout, [p.shape[2] for p in parts[1::2]]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads: list[torch.Tensor] = []
        for b, row in enumerate(ctx.layout.rows):
            P = row.prompt_len
            g_y = grad.new_zeros((len(row.lens), grad.shape[1], ctx.T[b], grad.shape[3]))
            off = P
            for g, m in enumerate(row.lens):
                g_y[g, :, :m] = grad[b, :, off:off + m]
                off += m
            grads += [grad[b:b + 1, :, :P].contiguous(), g_y]
        return (None, None, *grads)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
                     scaling: float | None, dropout: float = 0.0) -> torch.Tensor:
    """query (B, H, L, d), key/value (B, KV, L, d) -> (B, H, L, d) attention output of packed rows (a transposed
    view of a contiguous (B, L, H, d) tensor).

    Positions past a row's end (padding to the batch's longest row) get 0. Grouped-query attention is SDPA's
    (``enable_gqa``: no repeated key/value copies)."""
    L = query.shape[2]
    qs = _GatherRows.apply(query, layout, False)
    ks = _GatherRows.apply(key, layout, True)
    vs = _GatherRows.apply(value, layout, True)
    parts = []
    for b, row in enumerate(layout.rows):
        parts.append(F.scaled_dot_product_attention(qs[2 * b], ks[2 * b], vs[2 * b], dropout_p=dropout,
                                                    is_causal=True, scale=scaling, enable_gqa=True))  # (1, H, P, d)
        parts.append(F.scaled_dot_product_attention(qs[2 * b + 1], ks[2 * b + 1], vs[2 * b + 1], attn_mask=row.mask,
                                                    dropout_p=dropout, scale=scaling, enable_gqa=True))  # (G, H, T, d)
    return _ScatterRows.apply(layout, L, *parts)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               rlmt_layout: PackedLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: packed rows when ``rlmt_layout`` is given, else plain sdpa."""
    if rlmt_layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    low = (torch.bfloat16, torch.float16)
    if query.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or value.dtype in low or query.dtype in low):
        # under autocast (rlmt.rollout.precision): CPU flash attention's bfloat16 backward ran 3x slower than its float32
        # one at the GRPO benchmark's shapes (15 ms vs 5 ms a call, 1.8 s vs 0.6 s a step), so attention runs in
        # float32 with autocast off (autocast would cast SDPA's inputs back down)
        with torch.autocast("cpu", enabled=False):
            out = packed_attention(query.float(), key.float(), value.float(), rlmt_layout, scaling, dropout)
    else:
        out = packed_attention(query, key, value, rlmt_layout, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, d), as transformers' attention functions return (a no-op
    # for packed_attention's output, already that layout)


def register() -> None:
    """Register ``rlmt_packed`` (attention and its mask: sdpa's) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a model that uses ``sdpa`` to ``rlmt_packed`` (the same, plus packed rows). Returns whether the
    model now uses it; models with other attention keep theirs and get the dense-mask fallback."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    register()
    if cfg._attn_implementation != NAME:
        try:
            model.set_attn_implementation(NAME)
        except (ValueError, NotImplementedError, AttributeError):  # a model without the attention interface
            return False
    return cfg._attn_implementation == NAME
