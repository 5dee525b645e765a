"""Attention over packed prompt groups without a dense (L, L) mask.

A packed row (:func:`rlmt.logprobs.pack_groups`) holds a prompt once, then its G responses:
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


def _padded(x: torch.Tensor, lens: tuple[int, ...], T: int) -> torch.Tensor:
    """(h, sum(lens), d) segments along dim 1 -> (G, h, T, d), each zero-padded to T. Slices and pads only, so
    the backward is slicing too (an index gather with repeats would scatter-add serially on CPU)."""
    return torch.stack([F.pad(part, (0, 0, 0, T - part.shape[1])) for part in x.split(list(lens), 1)])


def _repeat_heads(x: torch.Tensor, rep: int) -> torch.Tensor:
    """(..., KV, L, d) -> (..., KV * rep, L, d); query head j reads kv head j // rep (as transformers' repeat_kv)."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=-3)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
                     scaling: float | None, dropout: float = 0.0) -> torch.Tensor:
    """query (B, H, L, d), key/value (B, KV, L, d) -> (B, H, L, d) attention output of packed rows.

    Positions past a row's end (padding to the batch's longest row) get 0."""
    _, H, L, d = query.shape
    rep = H // key.shape[1]
    rows = []
    for b, row in enumerate(layout.rows):
        P, lens = row.prompt_len, row.lens
        G, T, n = len(lens), row.mask.shape[2], P + sum(lens)
        q, k, v = query[b], key[b], value[b]  # (H, L, d), (KV, L, d)
        o_x = F.scaled_dot_product_attention(q[None, :, :P], _repeat_heads(k[None, :, :P], rep),
                                             _repeat_heads(v[None, :, :P], rep), dropout_p=dropout,
                                             is_causal=True, scale=scaling)[0]  # (H, P, d)
        parts = [o_x]
        if G:
            q_y = _padded(q[:, P:n], lens, T)  # (G, H, T, d)
            k_y = torch.cat([k[None, :, :P].expand(G, -1, -1, -1), _padded(k[:, P:n], lens, T)], 2)  # (G, KV, P+T, d)
            v_y = torch.cat([v[None, :, :P].expand(G, -1, -1, -1), _padded(v[:, P:n], lens, T)], 2)
            o_y = F.scaled_dot_product_attention(q_y, _repeat_heads(k_y, rep), _repeat_heads(v_y, rep),
                                                 attn_mask=row.mask, dropout_p=dropout, scale=scaling)  # (G, H, T, d)
            parts += [o_y[g, :, :m] for g, m in enumerate(lens) if m]
        rows.append(F.pad(torch.cat(parts, 1), (0, 0, 0, L - n)))  # (H, L, d)
    return torch.stack(rows)


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
        # under autocast (rlmt.precision): CPU flash attention's bfloat16 backward ran 3x slower than its float32
        # one at the GRPO benchmark's shapes (15 ms vs 5 ms a call, 1.8 s vs 0.6 s a step), so attention runs in
        # float32 with autocast off (autocast would cast SDPA's inputs back down)
        with torch.autocast("cpu", enabled=False):
            out = packed_attention(query.float(), key.float(), value.float(), rlmt_layout, scaling, dropout)
    else:
        out = packed_attention(query, key, value, rlmt_layout, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, d), as transformers' attention functions return


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
