"""One choice's text as its tokens arrive: incremental detokenizing, stop strings, and the text safe to send.

Detokenizing one token at a time (:class:`ChoiceText`) decodes a short window, not the whole completion: the
text of ``ids[prefix:]`` less the text of ``ids[prefix:read]``, where ``read`` is where the text last grew and
``prefix`` the boundary before it (vLLM's incremental detokenizer). The window keeps what a token decodes to
in context (a SentencePiece token's leading space is dropped at the start of a decode, kept after a token),
and a text ending in U+FFFD is held back until the next token: it may be the first bytes of a character
whose other bytes have not arrived. So a token costs two decodes of a few tokens, and a 4096-token completion
is not 4096 decodes of up to 4096 tokens. Decoding skips special tokens (the EOS) and does not clean up
tokenization spaces (that rewrites text already sent, " ." -> ".").

Stop strings: the text ends just before the first occurrence of any of them (OpenAI's rule: the stop string is
not part of the reply), and the completion counts the tokens up to the one that completed it. While the choice
runs, a suffix of the text that could still become a stop string is held back (:meth:`ChoiceText.ready`), so a
streamed reply never sends text that a later token turns into a stop. The streamed deltas therefore
concatenate to exactly the text a non-streamed reply gets.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class ChoiceText:
    """Tokens in (:meth:`push`, then :meth:`finish`); ``text`` (so far), ``tokens`` (counted), ``stopped`` out.

    ``decode``: token ids -> text (skipping special tokens); ``stop``: the stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.stopped = False  # a stop string ended the text
        self.finished = False

    @property
    def tokens(self) -> int:
        """Completion tokens: all pushed, or up to the one that completed a stop string."""
        return len(self.ids)

    def _grow(self, final: bool) -> None:
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def _check_stop(self, start: int) -> None:
        if not self.stop:
            return
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped, self.finished = self.text[:min(hits)], True, True

    def push(self, token: int) -> bool:
        """Append one token -> whether the text is now complete (a stop string ended it)."""
        if self.finished:
            return True
        self.ids.append(int(token))
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self._grow(final=False)
        self._check_stop(start)
        return self.stopped

    def finish(self) -> None:
        """The tokens have ended: decode what was held back (an incomplete character) and check the stops."""
        if self.finished:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self._grow(final=True)
        self._check_stop(start)
        self.finished = True

    def ready(self) -> str:
        """The text that no later token can change: all of it once finished; else less the longest suffix that
        begins some stop string."""
        if self.finished:
            return self.text
        for k in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return self.text[:-k]
        return self.text
