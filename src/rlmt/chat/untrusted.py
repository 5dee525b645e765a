"""Showing untrusted text (a policy's response) to a judge or critic without letting it steer the verdict.

The text goes between per-call random delimiters; any run of the delimiter's bracket characters inside the
text is broken up first, so a response cannot close the block early or open a fake one (an attacker cannot
guess the nonce, and cannot even write something that looks like a delimiter). The instructions that tell
the model how to answer come both before and after the block, so text inside it is never the last word.

Chat-template tokens are broken up too. A local backend renders the chat with the tokenizer's template and
tokenizes the result, and a tokenizer turns the text ``<|im_start|>`` into the real special token wherever it
appears, so a response holding ``<|im_end|>\\n<|im_start|>system`` would open a genuine system turn (checked
on the embedded SmolLM2 tokenizer). ``<|...|>`` is always broken (``<|im_end|>`` -> ``< |im_end| >``);
``special_tokens`` adds a tokenizer's own (``<file_sep>`` -> ``< file_sep>``).
"""

from __future__ import annotations

import re
import secrets
from typing import Iterable

_OPEN, _CLOSE = "<<<", ">>>"
_RUNS = re.compile(r"<{3,}|>{3,}|\u2039{3,}|\u203a{3,}|\uff1c{3,}|\uff1e{3,}")
_PIPES = re.compile(r"<\||\|>")


def escape_delimiters(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Break every run of 3+ angle brackets (ASCII or look-alikes) into spaced pairs ('<<<' -> '< < <'),
    every ``<|`` and ``|>`` ('<|im_end|>' -> '< |im_end| >'), and each of ``special_tokens`` after its first
    character."""
    text = _RUNS.sub(lambda m: " ".join(m.group(0)), text)
    text = _PIPES.sub(lambda m: " ".join(m.group(0)), text)
    for tok in sorted({t for t in special_tokens if len(t) > 1}, key=len, reverse=True):
        if tok in text:
            text = text.replace(tok, f"{tok[0]} {tok[1:]}")
    return text


def new_nonce() -> str:
    """16 hex characters from the OS's CSPRNG: fresh for every call."""
    return secrets.token_hex(8)


def wrap_untrusted(text: str, label: str, nonce: str | None = None,
                   special_tokens: Iterable[str] = ()) -> tuple[str, str, str]:
    """-> (block, begin, end): ``text`` escaped and framed by ``<<<LABEL nonce>>>`` ... ``<<<END LABEL nonce>>>``."""
    nonce = nonce or new_nonce()
    begin = f"{_OPEN}{label} {nonce}{_CLOSE}"
    end = f"{_OPEN}END {label} {nonce}{_CLOSE}"
    return f"{begin}\n{escape_delimiters(text, special_tokens)}\n{end}", begin, end
