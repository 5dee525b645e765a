"""The chat contract: requests, replies, usage statistics and the backend protocol."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion: OpenAI-style ``messages`` [{role, content}], a token budget and a temperature."""

    messages: tuple[dict, ...] | list[dict]
    max_tokens: int = 256
    temperature: float = 0.0

    def key(self, backend_name: str) -> str:
        """Cache key: sha256 over (backend, messages, max_tokens, temperature)."""
        blob = json.dumps([backend_name, list(self.messages), self.max_tokens, self.temperature], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ChatReply:
    """The completion text, or ``text=None`` with ``error`` set when the call failed."""

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


@dataclass
class ChatStats:
    """Running totals of a backend: calls made, cache hits, failures, retries, tokens and cost."""

    requests: int = 0
    calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{k}": float(v) for k, v in vars(self).items() if k != "extra"}
        out[f"{prefix}/cache_hit_rate"] = self.cache_hits / self.requests if self.requests else 0.0
        return out


class ChatBackend(Protocol):
    """``name`` identifies the model (it is part of every cache key); ``stats`` accumulates."""

    name: str
    stats: ChatStats

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]: ...
