"""Showing untrusted text (a policy's response) to a judge or critic without letting it steer the verdict.

The text goes between per-call random delimiters; any run of the delimiter's bracket characters inside the
text is broken up first, so a response cannot close the block early or open a fake one (an attacker cannot
guess the nonce, and cannot even write something that looks like a delimiter). The instructions that tell
the model how to answer come both before and after the block, so text inside it is never the last word.
"""

from __future__ import annotations

import re
import secrets

_OPEN, _CLOSE = "<<<", ">>>"
_RUNS = re.compile(r"<{3,}|>{3,}|\u2039{3,}|\u203a{3,}|\uff1c{3,}|\uff1e{3,}")


def escape_delimiters(text: str) -> str:
    """Break every run of 3+ angle brackets (ASCII or look-alikes) into spaced pairs: '<<<' -> '< < <'."""
    return _RUNS.sub(lambda m: " ".join(m.group(0)), text)


def new_nonce() -> str:
    """16 hex characters from the OS's CSPRNG: fresh for every call."""
    return secrets.token_hex(8)


def wrap_untrusted(text: str, label: str, nonce: str | None = None) -> tuple[str, str, str]:
    """-> (block, begin, end): ``text`` escaped and framed by ``<<<LABEL nonce>>>`` ... ``<<<END LABEL nonce>>>``."""
    nonce = nonce or new_nonce()
    begin = f"{_OPEN}{label} {nonce}{_CLOSE}"
    end = f"{_OPEN}END {label} {nonce}{_CLOSE}"
    return f"{begin}\n{escape_delimiters(text)}\n{end}", begin, end
