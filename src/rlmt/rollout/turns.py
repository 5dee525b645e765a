"""Episodes whose KV cache lives across turns: each running episode's cache is kept between its turns and only
the new tokens (the environment's reply) are computed before the next turn is sampled.

A :class:`TurnDecoder` holds one decoder (:mod:`rlmt.rollout.decode`) for a fixed set of rows, G per opening.
Its cache is *gappy*: every turn appends a left-padded block (each row's new tokens, padding first) and then
``max_new_tokens`` decode slots that all rows fill in lockstep. A row that ends its turn early keeps being fed
(its later tokens are discarded) and those slots, like the block's padding, are masked out of every later
attention; positions count a row's real tokens only. So each row attends to exactly its own tokens, in order,
as a fresh forward over them would. Rows whose episode ended are dropped between turns; nothing is dropped in
the middle of a turn (a dropped row's cache would be lost). The buffers grow when a turn needs more room.

Sampling is the engine's: keyed draws per row (:func:`rlmt.rollout.engine.keyed_uniforms`, the key of the
episode and the turn), inverse-CDF tokens, the log-prob at the sampling temperature, stop strings and EOS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from rlmt.rollout.decode import functional_dtype, make_decoder
from rlmt.rollout.engine import SamplingParams, eos_ids, keyed_uniforms, left_pad, sample_tokens
from rlmt.rollout.logprobs import position_ids_from_mask
from rlmt.rollout.precision import sampling_weights


class TurnDecoder:
    """The KV caches of ``len(openings) * G`` episodes (rows ``[p*G, (p+1)*G)`` open with ``openings[p]``),
    kept across their turns. Use it inside :meth:`session`, which holds the sampling weights."""

    def __init__(self, model: torch.nn.Module, tokenizer, params: SamplingParams, autocast: torch.dtype | None):
        self.model, self.tok, self.params = model, tokenizer, params
        if any(type(w).__name__ == "DTensor" for w in model.parameters()):
            autocast = None  # FSDP2-sharded layers: through forward only (as the engine)
        self.functional = functional_dtype(model, autocast) is not None  # its own weight copy in that dtype
        self.autocast = autocast
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = torch.tensor(eos_ids(model, tokenizer), dtype=torch.long, device=self.device)
        self.decoder = None

    @contextlib.contextmanager
    def session(self):
        """Held for the decoder's whole life (across turns): the model in eval mode, sampling from its weights
        in ``model.autocast``'s dtype (:func:`rlmt.rollout.precision.sampling_weights`; the functional decoder
        copies them instead)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with contextlib.nullcontext() if self.functional else sampling_weights(self.model, self.autocast):
                yield self
        finally:
            if was_training:
                self.model.train()

    @torch.no_grad()
    def open(self, openings: list[list[int]], G: int) -> None:
        ids, mask = left_pad(openings, self.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        T = self.params.max_new_tokens
        self.capacity = ids.shape[1] + 2 * T + 64
        self.decoder = make_decoder(self.model, self.capacity, self.autocast if self.functional else None)
        logits = self.decoder.prefill(ids, mask, position_ids_from_mask(mask))
        self.decoder.repeat_interleave(G)
        self.logits = logits.repeat_interleave(G, 0)  # (N, V): each row's next-token logits
        self.mask = mask.repeat_interleave(G, 0)  # (N, L): 1 on the cache slots a row attends to
        self.next_pos = self.mask.sum(-1)  # (N,)
        self.rows = list(range(len(openings) * G))  # the caller's row of each decoder row
        self.fresh = torch.ones(len(self.rows), dtype=torch.bool, device=self.device)  # logits follow the cache
        self.pending: dict[int, list[int]] = {}  # sampled tokens not yet in the cache, by caller row

    @torch.no_grad()
    def turn(self, rows: Sequence[int], blocks: Sequence[Sequence[int]],
             keys: Sequence[tuple[int, ...]]) -> list[tuple[list[int], list[float], str]]:
        """Sample one turn for the caller's ``rows`` (the ones still running), each after its ``blocks``
        tokens (the environment's reply; empty at the first turn). Returns (tokens, log-probs, text) per row."""
        self._keep(list(rows))
        blocks = [self.pending.pop(r, []) + list(b) for r, b in zip(rows, blocks)]
        self._extend(blocks)
        return self._sample(keys)

    def _keep(self, rows: list[int]) -> None:
        if rows == self.rows:
            return
        at = {r: i for i, r in enumerate(self.rows)}
        idx = torch.tensor([at[r] for r in rows], dtype=torch.long, device=self.device)
        self.decoder.select(idx)
        self.logits, self.mask, self.next_pos = self.logits[idx], self.mask[idx], self.next_pos[idx]
        self.fresh, self.rows = self.fresh[idx], rows

    def _room(self, n: int) -> None:
        """Room for ``n`` more cache slots (the buffers grow by copying)."""
        need = self.mask.shape[1] + n
        if need > self.capacity:
            self.capacity = max(need, 2 * self.capacity)
            self.decoder.grow(self.capacity)

    def _extend(self, blocks: list[list[int]]) -> None:
        S = max((len(b) for b in blocks), default=0)
        if not S:
            return
        self._room(S)
        has = torch.tensor([len(b) > 0 for b in blocks], device=self.device)
        ids, bmask = left_pad([b if b else [self.pad] for b in blocks], self.pad, S)
        ids, bmask = ids.to(self.device), bmask.to(self.device)
        bmask[~has] = 0
        pos = self.next_pos[:, None] + (bmask.cumsum(-1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, bmask], 1)
        logits = self.decoder.extend(ids, self.mask, pos)
        self.logits = torch.where(has[:, None], logits, self.logits)
        self.next_pos = self.next_pos + bmask.sum(-1)
        self.fresh = self.fresh | has

    def _sample(self, keys: Sequence[tuple[int, ...]]) -> list[tuple[list[int], list[float], str]]:
        p, N = self.params, len(self.rows)
        if not bool(self.fresh.all()):
            raise ValueError("a row continues a turn without new tokens: the next turn needs the environment's reply")
        T = p.max_new_tokens
        self._room(T)
        base = self.mask.shape[1]
        table = keyed_uniforms(keys, T).to(self.device) if p.temperature > 0 else None  # (N, T)
        tokens = torch.full((N, T), self.pad, dtype=torch.long, device=self.device)
        logps = torch.zeros((N, T), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(N, dtype=torch.long, device=self.device)
        alive = torch.ones(N, dtype=torch.bool, device=self.device)
        stop = tuple(p.stop)
        window = max((len(s) for s in stop), default=0) + 8
        mask = torch.cat([self.mask, self.mask.new_ones((N, T))], 1)
        logits, fed = self.logits, 0
        for t in range(T):
            tok, lp = sample_tokens(logits, p.temperature, p.top_p, None, None if table is None else table[:, t])
            tokens[alive, t], logps[alive, t] = tok[alive], lp[alive]
            lengths[alive] = t + 1
            done = alive & torch.isin(tok, self.eos)
            for j in (alive & ~done).nonzero().flatten().tolist() if stop else ():
                tail = self.tok.decode(tokens[j, max(0, t + 1 - window):t + 1])
                if any(s in tail for s in stop):
                    done[j] = True
            alive &= ~done
            if not alive.any() or t == T - 1:
                break
            logits = self.decoder.step(tok, mask[:, :base + t + 1], self.next_pos + t)
            fed = t + 1
        # a row's slots hold its tokens up to the ones fed; the rest (after it ended) are masked from now on
        valid = torch.minimum(lengths, torch.tensor(fed, device=self.device))
        slot = torch.arange(fed, device=self.device)[None, :] < valid[:, None]
        self.mask = torch.cat([self.mask, slot.long()], 1)
        self.next_pos = self.next_pos + valid
        self.logits = logits
        self.fresh = torch.zeros_like(self.fresh)  # the last sampled tokens are not all in the cache
        out = []
        for i, r in enumerate(self.rows):
            n, v = int(lengths[i]), int(valid[i])
            toks = tokens[i, :n].tolist()
            self.pending[r] = toks[v:]  # sampled, not yet in the cache: they open the next block
            text = self.tok.decode(toks, skip_special_tokens=True)
            for s in stop:
                if s in text:
                    text = text[:text.index(s) + len(s)]
            out.append((toks, logps[i, :n].tolist(), text))
        return out
