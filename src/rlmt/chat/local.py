"""A chat backend on a local transformers model: the policy's own rollout engine, used as a judge or critic.

Decisions:

- The model is loaded once per backend (or an already-loaded :class:`rlmt.models.LoadedModel` is shared via
  :meth:`LocalChat.from_loaded`); its chat template turns messages into the prompt.
- Requests are grouped by (temperature, max_tokens), since one :func:`rlmt.rollout.generate` call samples
  with one setting, and run in batches of ``max_batch`` prompts. Temperature 0 is greedy.
- A lock serialises generation: callers may use the backend from several threads and a model is not
  re-entrant. Batching across threads is the caller's job (``rlmt serve`` has its own scheduler, not this).
- The optional in-memory cache (on by default) is keyed by :meth:`ChatRequest.key`; identical requests in
  one call are generated once. A cached sample at temperature > 0 is the same sample again, so a server
  that must draw fresh samples turns the cache off.
- A batch that raises (e.g. a prompt longer than the model's context) becomes failed replies
  (``text=None``, ``error`` set), never an exception out of :meth:`complete`.
"""

from __future__ import annotations

import threading
from typing import Sequence

from rlmt.chat.base import ChatReply, ChatRequest, ChatStats


class LocalChat:
    """``complete(requests)``: one reply per request, in order; see the module doc."""

    def __init__(self, model: str = "smollm2-135m-instruct", max_batch: int = 16, seed: int = 0,
                 device: str = "cpu", dtype: str = "float32", cache: bool = True):
        from rlmt.models import load_model

        self._setup(load_model(model, dtype=dtype, device=device, seed=seed), max_batch, seed, cache)

    @classmethod
    def from_loaded(cls, lm, max_batch: int = 16, seed: int = 0, cache: bool = True) -> "LocalChat":
        """Wrap an already-loaded :class:`rlmt.models.LoadedModel` (e.g. the policy itself) without reloading."""
        self = cls.__new__(cls)
        self._setup(lm, max_batch, seed, cache)
        return self

    def _setup(self, lm, max_batch: int, seed: int, cache: bool) -> None:
        import torch

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.name = f"local:{lm.name}"
        self.max_batch = max_batch
        self.stats = ChatStats()
        self.use_cache = cache
        self._cache: dict[str, tuple[ChatReply, bool]] = {}
        self._lock = threading.Lock()
        device = next(self.model.parameters()).device
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """Token ids of the messages under the model's chat template, ending with the assistant's turn."""
        from rlmt.data import PromptFormat, encode_prompt

        return encode_prompt(self.tokenizer, PromptFormat(chat=True), [dict(m) for m in request.messages])

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        return [reply for reply, _ in self.complete_with_finish(requests)]

    def complete_with_finish(self, requests: Sequence[ChatRequest]) -> list[tuple[ChatReply, bool]]:
        """Like :meth:`complete`, with whether each reply ended on its own (EOS) rather than at ``max_tokens``."""
        with self._lock:
            self.stats.requests += len(requests)
            if not self.use_cache:  # every request is its own sample, identical ones included
                return self._generate_all(list(requests))
            keys = [r.key(self.name) for r in requests]
            todo: dict[str, ChatRequest] = {}
            for k, r in zip(keys, requests):
                if k not in self._cache and k not in todo:
                    todo[k] = r
            self.stats.cache_hits += len(keys) - len(todo)
            fresh_by_key = dict(zip(todo, self._generate_all(list(todo.values()))))
            self._cache.update({k: v for k, v in fresh_by_key.items() if v[0].text is not None})
            out = []
            for k in keys:
                if k in fresh_by_key:
                    out.append(fresh_by_key[k])
                else:
                    reply, finished = self._cache[k]
                    out.append((ChatReply(reply.text, None, reply.prompt_tokens, reply.completion_tokens, True),
                                finished))
            return out

    def _generate_all(self, requests: list[ChatRequest]) -> list[tuple[ChatReply, bool]]:
        """Group by (temperature, max_tokens), generate in batches of ``max_batch``, restore the order; one copy
        of the decoder's weights for all the batches (:func:`rlmt.rollout.weights_shared`)."""
        from rlmt.rollout import weights_shared

        with weights_shared():
            return self._generate_groups(requests)

    def _generate_groups(self, requests: list[ChatRequest]) -> list[tuple[ChatReply, bool]]:
        results: list[tuple[ChatReply, bool] | None] = [None] * len(requests)
        groups: dict[tuple[float, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((float(r.temperature), int(r.max_tokens)), []).append(i)
        for (temperature, max_tokens), idx in groups.items():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start:start + self.max_batch]
                for i, res in zip(chunk, self._generate_batch([requests[i] for i in chunk], temperature, max_tokens)):
                    results[i] = res
        return [r for r in results if r is not None]

    def _generate_batch(self, requests: list[ChatRequest], temperature: float,
                        max_tokens: int) -> list[tuple[ChatReply, bool]]:
        from rlmt.rollout import SamplingParams, generate

        self.stats.calls += len(requests)
        try:
            ids = [self.prompt_ids(r) for r in requests]
            params = SamplingParams(num_samples=1, temperature=temperature, top_p=1.0, max_new_tokens=max_tokens)
            batch = generate(self.model, self.tokenizer, ids, params, self._generator)
        except Exception as e:  # noqa: BLE001 - a failed batch is failed replies, not a crash of the caller
            self.stats.failures += len(requests)
            return [(ChatReply(None, f"local generation failed: {type(e).__name__}: {e}"), False) for _ in requests]
        lengths = batch.response_lengths.tolist()
        out = []
        for i, text in enumerate(batch.texts):
            self.stats.prompt_tokens += len(ids[i])
            self.stats.completion_tokens += int(lengths[i])
            out.append((ChatReply(text, None, len(ids[i]), int(lengths[i])), bool(batch.finished[i])))
        return out
