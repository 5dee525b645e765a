"""Prompts, completions and steps as token ids: the prompt format (chat template or plain text), the
completion encoder (end-of-turn token, truncation counted), SFT rows, and where each token ends in the text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlmt.data.rows import DataError, LoadReport, Row



@dataclass(frozen=True)
class PromptFormat:
    """How rows become token ids: chat template or plain text, and an optional system message."""

    chat: bool = True
    system_prompt: str | None = None

    def messages(self, prompt: str | list) -> list[dict]:
        if isinstance(prompt, list):
            return prompt
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def prompt_text(self, tokenizer, prompt: str | list) -> str:
        if self.chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, list):
            return "\n".join(m["content"] for m in prompt) + "\n"
        return prompt


def encode_prompt(tokenizer, fmt: PromptFormat, prompt: str | list) -> list[int]:
    return tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def completion_end_ids(tokenizer) -> list[int]:
    """Tokens that end an assistant turn (the EOS, which for chat models closes the turn)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclass
class SFTExample:
    """Token ids of one SFT example; the loss falls on ``completion_ids`` only."""

    prompt_ids: list[int]
    completion_ids: list[int]


def split_sft_row(row: dict) -> tuple[str | list, str]:
    """(prompt, completion) of an SFT row; for ``messages`` rows the last assistant turn is the completion."""
    if "completion" in row:
        return row["prompt"], row["completion"]
    msgs = row["messages"]
    return msgs[:-1], msgs[-1]["content"]


def prompt_ids_within_limit(row: Row, prompt, tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                           on_invalid: str = "error", report: LoadReport | None = None) -> list[int] | None:
    """Token ids of ``prompt``; None (skipped, counted) or a :class:`DataError` when it is too long."""
    ids = encode_prompt(tokenizer, fmt, prompt)
    if len(ids) <= max_prompt_tokens:
        return ids
    if on_invalid == "skip":
        if report is not None:
            report.skip("prompt longer than data.max_prompt_tokens")
        return None
    raise DataError(row.file, row.line, "prompt" if "prompt" in row.data else "messages",
                    f"prompt is {len(ids)} tokens, longer than data.max_prompt_tokens={max_prompt_tokens}")


def encode_completion(tokenizer, text: str, max_completion_tokens: int, report: LoadReport | None = None,
                      field_name: str = "completion") -> list[int]:
    """Completion ids followed by the end-of-turn token, truncated to ``max_completion_tokens`` (counted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + completion_end_ids(tokenizer)
    if len(ids) > max_completion_tokens:
        ids = ids[:max_completion_tokens]
        if report is not None:
            report.skip(f"{field_name} truncated to data.max_completion_tokens (kept)")
    return ids


def tokenize_sft(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                 max_completion_tokens: int, on_invalid: str = "error",
                 report: LoadReport | None = None) -> list[SFTExample]:
    """Tokenize SFT rows; over-long prompts are an error (or skipped), long completions are truncated."""
    out = []
    for row in rows:
        prompt, completion = split_sft_row(row.data)
        p_ids = prompt_ids_within_limit(row, prompt, tokenizer, fmt, max_prompt_tokens, on_invalid, report)
        if p_ids is not None:
            out.append(SFTExample(p_ids, encode_completion(tokenizer, completion, max_completion_tokens, report)))
    return out


def check_prompt_lengths(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                         on_invalid: str = "error", report: LoadReport | None = None) -> list[Row]:
    """Drop (or reject) prompt rows whose formatted prompt exceeds ``max_prompt_tokens``."""
    return [row for row in rows if prompt_ids_within_limit(row, row.data["prompt"], tokenizer, fmt,
                                                           max_prompt_tokens, on_invalid, report) is not None]


def token_char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """The character offset of the decoded text after each token: ``ends[t] = len(decode(ids[:t + 1]))``.

    Decoded as the rollout decodes responses (``skip_special_tokens=True``), so offsets index the same text
    a reward source saw. Made non-decreasing (a partial multi-byte character may decode to a longer
    placeholder than the finished character).
    """
    ends, reached = [], 0
    for t in range(len(ids)):
        reached = max(reached, len(tokenizer.decode(list(ids[:t + 1]), skip_special_tokens=True)))
        ends.append(reached)
    return ends
