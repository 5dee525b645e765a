"""Chat backends: one interface for a local transformers model and any OpenAI-compatible endpoint.

Judges (RLAIF) and critics (GRAPE) talk to a :class:`ChatBackend`: a batch of :class:`ChatRequest` in, one
:class:`ChatReply` per request out, in order. A reply whose call failed has ``text=None`` and an ``error``;
callers treat it as missing, never as a verdict. ``build_chat_backend(spec)`` makes one from a config dict:

- ``{backend: local, model: NAME_OR_DIR, ...}``: :class:`rlmt.chat.local.LocalChat` (greedy by default);
- ``{backend: http, base_url: http://host:port/v1, model: NAME, ...}``: :class:`rlmt.chat.http.OpenAIChat`.
"""

from __future__ import annotations

from rlmt.chat.base import ChatBackend, ChatReply, ChatRequest, ChatStats


def build_chat_backend(spec: dict) -> ChatBackend:
    """Make a backend from a config dict (see the module doc). Unknown keys are a ValueError naming them."""
    spec = dict(spec or {})
    kind = spec.pop("backend", "local")
    if kind == "local":
        from rlmt.chat.local import LocalChat

        return LocalChat(**spec)
    if kind == "http":
        from rlmt.chat.http import OpenAIChat

        return OpenAIChat(**spec)
    raise ValueError(f"backend: unknown chat backend {kind!r} (known: 'local', 'http')")


__all__ = ["ChatBackend", "ChatReply", "ChatRequest", "ChatStats", "build_chat_backend"]
