"""The rows the server decodes together: one dense KV cache that requests join and leave between decode steps.

Layout: per layer, keys and values ``(B, kv_heads, C, head_dim)`` with slots ``[0, L)`` filled and ``C >= L`` the
capacity; ``key_mask (B, C)`` is 1 on a row's real keys. Every row's keys are right-aligned (they end at slot
``L``): a row that joined later, or whose prompt is shorter, has masked zeros before its first key. Positions
are per row (``next_pos``), so rotary embeddings do not depend on where a row sits in the cache.

- :func:`prefill`: a new cohort's prompts (left-padded) in one forward -> a batch and the logits of each
  row's first token.
- :meth:`RunningBatch.step`: one token per row in one forward, every row of the batch at once.
- :func:`relayout`: the rows of one or two batches as one new batch (joining, leaving, preemption). It drops
  the slots no kept row uses (trim), so the cache length follows the longest live row, not the server's uptime.
  Masked slots are zeroed: a padded key or value is never NaN, since 0 x NaN in attention would poison real rows.

Cost: a relayout copies the kept cache once (B x L x layers x 2 x kv_heads x head_dim values; SmolLM2-135M in
float32: 46 KB a token), so the scheduler relayouts only when rows join, or when a quarter of them have left.
Memory is B x the longest row, at most ``max_batch`` x the model's context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rlmt.rollout import left_pad
from rlmt.rollout.logprobs import cache_kwarg, position_ids_from_mask


@functools.cache
def _buffer_layer_class():
    """A transformers cache layer writing new keys/values in place into ``(B, kv_heads, capacity, hd)`` buffers
    (made on the first write when none are given) and handing attention a view of slots ``[0, length)``.
    Made once (transformers is imported only when the server runs)."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, length: int, capacity: int):
            super().__init__()
            self.kbuf, self.vbuf, self.length, self.capacity = k, v, length, capacity
            if k is not None:
                self.is_initialized, self.device = True, k.device
                self._views()

        def _views(self):
            self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]
            return self.keys, self.values

        def update(self, key_states, value_states, *args, **kwargs):
            if self.kbuf is None:
                B, H, _, hd = key_states.shape
                self.kbuf = key_states.new_zeros((B, H, self.capacity, hd))
                self.vbuf = value_states.new_zeros((B, H, self.capacity, hd))
                self.is_initialized, self.device = True, key_states.device
            n = key_states.shape[-2]
            self.kbuf[:, :, self.length:self.length + n] = key_states
            self.vbuf[:, :, self.length:self.length + n] = value_states
            self.length += n
            return self._views()

        def get_seq_length(self) -> int:
            return self.length

        def grow(self, capacity: int) -> None:
            extra = capacity - self.kbuf.shape[2]
            if extra > 0:
                pad = (0, 0, 0, extra)
                self.kbuf = torch.nn.functional.pad(self.kbuf, pad)
                self.vbuf = torch.nn.functional.pad(self.vbuf, pad)
                self.capacity = capacity
                self._views()

    return BufferLayer


def _buffer_layer(k: torch.Tensor | None, v: torch.Tensor | None, length: int, capacity: int):
    return _buffer_layer_class()(k, v, length, capacity)


def headroom(length: int) -> int:
    """Spare slots a (re)allocated cache gets, so growth reallocates every ~L/4 steps, not every step."""
    return max(64, length // 4)


@dataclass
class RunningBatch:
    """B rows: ``layers`` (one cache layer per model layer), ``key_mask (B, C)``, ``next_pos (B,)`` (position of
    the token each row feeds next), ``last (B,)`` (that token, sampled but not yet in the cache), ``rows`` (the
    scheduler's object for each row, in order)."""

    model: torch.nn.Module
    layers: list
    length: int
    key_mask: torch.Tensor
    next_pos: torch.Tensor
    last: torch.Tensor
    rows: list
    cache_kw: str = "past_key_values"  # the name model.forward takes its cache under (rlmt.rollout.logprobs.cache_kwarg)

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    def _forward(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        from transformers.cache_utils import Cache

        out = self.model(input_ids=ids, attention_mask=key_mask, position_ids=pos,
                         **{self.cache_kw: Cache(layers=self.layers)}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def step(self) -> torch.Tensor:
        """Feed ``last`` at ``next_pos`` for every row -> (B, V) logits of each row's next token."""
        if self.length + 1 > self.capacity:
            capacity = self.length + 1 + headroom(self.length)
            for layer in self.layers:
                layer.grow(capacity)
            self.key_mask = torch.nn.functional.pad(self.key_mask, (0, capacity - self.capacity))
        self.key_mask[:, self.length] = 1
        logits = self._forward(self.last[:, None], self.key_mask[:, :self.length + 1], self.next_pos[:, None])
        self.length += 1
        self.next_pos = self.next_pos + 1
        return logits


def prefill(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, rows: list) -> tuple[RunningBatch, torch.Tensor]:
    """Prefill ``prompts`` (token ids) in one forward -> (their batch, (B, V) logits of each first token).
    ``last`` is left for the caller to set to the sampled first tokens."""
    ids, mask = left_pad(prompts, pad_id)  # (B, P)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    P = ids.shape[1]
    capacity = P + headroom(P)
    layers = [_buffer_layer(None, None, 0, capacity) for _ in range(model.config.num_hidden_layers)]
    key_mask = torch.nn.functional.pad(mask, (0, capacity - P))
    last = torch.zeros(len(prompts), dtype=torch.long, device=device)
    batch = RunningBatch(model, layers, 0, key_mask, mask.sum(-1), last, list(rows), cache_kwarg(model))
    logits = batch._forward(ids, mask, position_ids_from_mask(mask))
    batch.length = P
    return batch, logits


def relayout(parts: list[tuple[RunningBatch, list[int]]]) -> RunningBatch | None:
    """The rows ``idx`` of each ``(batch, idx)`` in ``parts``, in that order, as one new right-aligned batch
    whose length is the longest kept row's span; None when no row is kept."""
    parts = [(b, idx) for b, idx in parts if idx]
    if not parts:
        return None
    spans = []  # per part: (first slot any kept row uses, its length - that slot)
    for b, idx in parts:
        used = b.key_mask[idx, :b.length].any(0).nonzero()
        start = int(used[0]) if len(used) else b.length
        spans.append((start, b.length - start))
    L = max(n for _, n in spans)
    C = L + headroom(L)
    B = sum(len(idx) for _, idx in parts)
    first = parts[0][0]
    key_mask = first.key_mask.new_zeros((B, C))
    layers, r = [], 0
    placed = []  # (rows slice, part, idx, start, n)
    for (b, idx), (start, n) in zip(parts, spans):
        key_mask[r:r + len(idx), L - n:L] = b.key_mask[idx, start:b.length]
        placed.append((slice(r, r + len(idx)), b, idx, start, n))
        r += len(idx)
    keep = key_mask[:, None, :L, None].bool()  # (B, 1, L, 1)
    for i, layer in enumerate(first.layers):
        k = layer.kbuf.new_zeros((B, layer.kbuf.shape[1], C, layer.kbuf.shape[3]))
        v = torch.zeros_like(k)
        for rows, b, idx, start, n in placed:
            k[rows, :, L - n:L] = b.layers[i].kbuf[idx, :, start:b.length]
            v[rows, :, L - n:L] = b.layers[i].vbuf[idx, :, start:b.length]
        k[:, :, :L] = torch.where(keep, k[:, :, :L], 0.0)
        v[:, :, :L] = torch.where(keep, v[:, :, :L], 0.0)
        layers.append(_buffer_layer(k, v, L, C))
    next_pos = torch.cat([b.next_pos[idx] for b, idx in parts])
    last = torch.cat([b.last[idx] for b, idx in parts])
    return RunningBatch(first.model, layers, L, key_mask, next_pos, last, [b.rows[j] for b, idx in parts for j in idx],
                        first.cache_kw)
