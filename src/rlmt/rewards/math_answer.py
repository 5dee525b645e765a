"""Verifier for math final answers (RLVR): extract the model's answer, compare it to the gold one.

Pure functions first: :func:`extract_answer` finds the final answer in a response, :func:`parse_number`
turns an answer string into an exact :class:`~fractions.Fraction`, :func:`answers_match` compares a
prediction with a gold answer. :class:`MathAnswerReward` wraps them as a reward source.

Every function is bounded in time: only the last ``SCAN_CHARS`` characters of a response are scanned, the
regular expressions are linear, and exponents beyond ``MAX_EXPONENT`` are refused rather than expanded
into giant integers.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Sequence

from rlmt.rewards.base import RewardResult

SCAN_CHARS = 4000
MAX_EXPONENT = 1000
MODES = ("auto", "marked", "last_number")

# One number: optional sign, digits with optional thousands commas or a decimal part (".5" and "5." too),
# optional exponent, optional integer denominator ("3/4"). No nested quantifiers, so no backtracking blow-up.
_NUMBER = re.compile(
    r"(?<![0-9.])[-+]?"
    r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:[eE][-+]?[0-9]+)?"
    r"(?:/[0-9]+)?"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_PHRASE = re.compile(
    r"\banswer(?:\*\*)?[ \t]*(?:is(?![\w'’])[ \t]*:?|:)(?:\*\*)?[ \t]*([^\n]*)", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[0-9]+)\s*\}\s*\{\s*([0-9]+)\s*\}")
_LATEX_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*([0-9])\s*([0-9])")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\\?\$|\\?%|\^\s*\{?\s*\\circ\s*\}?|°|[\u2009\u202f]")
# Characters that make "one number plus words" a formula rather than a number with a unit ("x^2", "2\pi").
_FORMULA_CHARS = frozenset("\\^_*/+!{}|<>√π")


def _clean_latex(s: str) -> str:
    """Rewrite LaTeX and typography around numbers into plain text (``\\frac{3}{4}`` -> ``3/4``, no ``$``)."""
    s = s.replace("\u2212", "-").replace("\u00a0", " ").replace("{,}", ",")
    s = _TEXT_COMMAND.sub(r" \1 ", s)
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    s = _LATEX_FRAC_SHORT.sub(r"\1/\2", s)
    return _LATEX_NOISE.sub("", s)


def _boxed_content(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces allowed), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts[-8:]):  # a truncated last box falls back to an earlier one
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:i].strip()
                    if content:
                        return content
                    break
    return None


def _marked_answer(text: str) -> str | None:
    """The answer behind a marker, by precedence: last ``\\boxed{}``, last ``####``, last "answer is/Answer:"."""
    boxed = _boxed_content(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_PHRASE):
        matches = list(pattern.finditer(text))
        if matches:
            candidate = matches[-1].group(1)
            end = _SENTENCE_END.search(candidate)
            candidate = (candidate[: end.start()] if end else candidate).strip().strip("$*").strip()
            if candidate:
                return candidate
    return None


def _last_number(text: str) -> str | None:
    """The last number written in ``text`` (LaTeX fractions count as one number), without a trailing period."""
    last = None
    for last in _NUMBER.finditer(_clean_latex(text)):
        pass
    if last is None:
        return None
    token = last.group()
    return token[:-1] if token.endswith(".") and len(token) > 1 else token


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """Find the model's final answer in ``text``; None when there is none.

    ``mode``: "auto" takes a marked answer (``\\boxed{...}``, ``#### X``, "answer is X" / "Answer: X") and
    otherwise the last number; "marked" requires a marker; "last_number" ignores markers. Only the last
    ``SCAN_CHARS`` characters are scanned, since the final answer sits at the end.
    """
    if mode not in MODES:
        raise ValueError(f"extract_answer: unknown mode {mode!r}; expected one of {MODES}")
    text = text[-SCAN_CHARS:]
    if mode != "last_number":
        marked = _marked_answer(text)
        if marked is not None or mode == "marked":
            return marked
    return _last_number(text)


def _token_to_fraction(token: str) -> Fraction | None:
    """Exact value of one :data:`_NUMBER` token; None for a zero denominator or an exponent past the cap."""
    numerator, _, denominator = token.replace(",", "").partition("/")
    mantissa, _, exponent = numerator.lower().partition("e")
    if exponent and (len(exponent) > 6 or abs(int(exponent)) > MAX_EXPONENT):
        return None
    try:
        value = Fraction(mantissa) * Fraction(10) ** int(exponent or 0)
    except (ValueError, ZeroDivisionError):
        return None
    if denominator:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return value


def parse_number(s: str) -> Fraction | None:
    """Parse an answer string into an exact Fraction, or None when it is not a single number.

    Accepts signs (``+5``, ``-5``, unicode minus), thousands separators (``1,234``), decimals (``.5``,
    ``5.``), scientific notation (``1e3``, exponent at most ``MAX_EXPONENT``), fractions (``3/4``,
    ``\\frac{3}{4}``, ``\\dfrac``), and a number with a unit or currency (``$12``, ``12 dollars``,
    ``90^\\circ``). Percent signs are dropped: ``50%`` parses as 50, the number written. The right-hand side
    of an equation counts (``x = 5`` is 5). Formulas such as ``x^2``, ``2\\pi`` or ``\\sqrt{2}`` are not
    numbers, so they fall back to string comparison in :func:`answers_match`.
    """
    if not isinstance(s, str) or len(s) > SCAN_CHARS:
        return None
    text = _clean_latex(s).rsplit("=", 1)[-1]
    tokens = list(_NUMBER.finditer(text))
    if len(tokens) != 1:
        return None
    before, after = text[: tokens[0].start()], text[tokens[0].end():]
    if before[-1:].isalpha() or _FORMULA_CHARS.intersection(before + after):
        return None
    return _token_to_fraction(tokens[0].group())


def _gold_number(gold: Any) -> Fraction | None:
    """Exact value of a gold answer given as int, float, Fraction or string; None when not a number."""
    if isinstance(gold, bool):
        return None
    if isinstance(gold, (int, Fraction)):
        return Fraction(gold)
    if isinstance(gold, float):
        return parse_number(repr(gold)) if math.isfinite(gold) else None  # repr: 0.1 means 1/10
    return parse_number(str(gold))


def gold_answer_problem(gold: Any) -> str | None:
    """Why ``gold`` cannot be a gold answer, or None: it must be an integer, a finite float or a non-empty
    string (a formula such as ``x^2`` is compared as text). A boolean, a list or an object would otherwise be
    compared by its printed form and score a silent 0 (or, for ``[4]``, match 4)."""
    if isinstance(gold, bool) or not isinstance(gold, (int, float, str, Fraction)):
        return f"must be a number or a string, got {'a boolean' if isinstance(gold, bool) else type(gold).__name__}"
    if isinstance(gold, float) and not math.isfinite(gold):
        return f"must be a finite number, got {gold}"
    if isinstance(gold, str) and not gold.strip():
        return "must not be empty"
    return None


def _normalize_text(s: str) -> str:
    """Lowercased answer text without LaTeX spacing, ``$``, whitespace and a trailing period."""
    s = _clean_latex(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def answers_match(pred: str | None, gold: Any, rel_tol: float = 0.0) -> bool:
    """Whether the predicted answer equals the gold one.

    Numerically when both parse (exact Fraction equality, or ``|p - g| <= rel_tol * max(|p|, |g|)`` when
    ``rel_tol > 0``), so ``0.5 == 1/2 == \\frac{1}{2}``; otherwise by normalized string equality.
    """
    if pred is None:
        return False
    p, g = parse_number(pred), _gold_number(gold)
    if p is not None and g is not None:
        if rel_tol == 0:
            return p == g
        return abs(p - g) <= Fraction(rel_tol) * max(abs(p), abs(g))
    normalized = _normalize_text(pred)
    return normalized != "" and normalized == _normalize_text(str(gold))


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"math_answer: {name} must be finite, got {value}")
    return value


class MathAnswerReward:
    """Reward ``correct`` when a response's final answer equals ``row[answer_field]``, else ``incorrect``.

    A response without an answer is a valid, wrong response (scored ``incorrect``, ``extracted`` None);
    a row without the gold field, or with a gold answer of the wrong type (:func:`gold_answer_problem`), is a
    data error: :meth:`required_fields` lets the run check it with the data, before the model loads, and
    :meth:`score` raises ValueError for a row that was not checked.
    """

    name = "math_answer"

    @classmethod
    def required_fields(cls, args: dict[str, Any]) -> dict[str, Any]:
        """The gold field (``answer_field``) and its check."""
        return {args.get("answer_field", "answer"): gold_answer_problem}

    @classmethod
    def score_range(cls, args: dict[str, Any]) -> tuple[float, float]:
        """The lower and the higher of ``correct`` and ``incorrect``: the only scores it gives."""
        scores = (float(args.get("correct", 1.0)), float(args.get("incorrect", 0.0)))
        return min(scores), max(scores)

    def __init__(self, answer_field: str = "answer", mode: str = "auto", rel_tol: float = 0.0,
                 correct: float = 1.0, incorrect: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"math_answer: unknown mode {mode!r}; expected one of {MODES}")
        if not _finite("rel_tol", rel_tol) >= 0:
            raise ValueError(f"math_answer: rel_tol must be >= 0, got {rel_tol}")
        self.answer_field = answer_field
        self.mode = mode
        self.rel_tol = float(rel_tol)
        self.correct = _finite("correct", correct)
        self.incorrect = _finite("incorrect", incorrect)

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult:
        """One score per response, with details ``{"extracted", "gold", "correct"}``."""
        scores: list[float | None] = []
        details: list[dict[str, Any]] = []
        for i, (row, response) in enumerate(zip(rows, responses)):
            if self.answer_field not in row or row[self.answer_field] is None:
                keys = sorted(map(str, row))
                raise ValueError(f"math_answer: row {i} has no {self.answer_field!r} field (keys: {keys})")
            gold = row[self.answer_field]
            problem = gold_answer_problem(gold)
            if problem:
                raise ValueError(f"math_answer: row {i}: field {self.answer_field!r} {problem}")
            extracted = extract_answer(response or "", self.mode)
            ok = answers_match(extracted, gold, self.rel_tol)
            scores.append(self.correct if ok else self.incorrect)
            details.append({"extracted": extracted, "gold": gold, "correct": ok})
        return RewardResult(scores, details)
