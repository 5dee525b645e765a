"""Token batches for the offline methods: SFT rows (padded or packed), preference pairs and step-labelled
rows, tokenized from validated rows and collated into right-padded tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from rlmt.data.rows import DataError, LoadReport, Row
from rlmt.data.tokenize import (PromptFormat, SFTExample, encode_completion, prompt_ids_within_limit,
                                token_char_ends)
from rlmt.objectives.process import step_end_positions


@dataclass
class TokenBatch:
    """(B, L) ids, attention (2D 0/1, or 4D block-diagonal for packed rows), target mask, positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def to(self, device) -> "TokenBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TokenBatch(move(self.input_ids), move(self.attention_mask), move(self.target_mask),
                          move(self.position_ids))


def collate_sft(examples: list[SFTExample], pad_id: int) -> TokenBatch:
    """Right-padded rows [prompt | completion]; targets are the completion tokens only."""
    L = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    target = torch.zeros((len(examples), L), dtype=torch.bool)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.completion_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        target[i, len(e.prompt_ids):len(seq)] = True
    return TokenBatch(ids, attn, target)


def pack_sft(examples: list[SFTExample], pad_id: int, pack_length: int) -> TokenBatch:
    """Greedily concatenate examples into rows of ``pack_length`` tokens.

    Attention is block-diagonal (each example sees only itself) and positions restart per example, so a
    packed row computes exactly what the examples would compute alone. An example longer than
    ``pack_length`` gets a row of its own.
    """
    rows: list[list[SFTExample]] = [[]]
    for e in examples:
        n = len(e.prompt_ids) + len(e.completion_ids)
        if rows[-1] and sum(len(x.prompt_ids) + len(x.completion_ids) for x in rows[-1]) + n > pack_length:
            rows.append([])
        rows[-1].append(e)
    L = max(sum(len(x.prompt_ids) + len(x.completion_ids) for x in r) for r in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    target = torch.zeros((B, L), dtype=torch.bool)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for j, e in enumerate(r):
            seq = e.prompt_ids + e.completion_ids
            ids[i, at:at + len(seq)] = torch.tensor(seq)
            target[i, at + len(e.prompt_ids):at + len(seq)] = True
            pos[i, at:at + len(seq)] = torch.arange(len(seq))
            seg[i, at:at + len(seq)] = j
            at += len(seq)
    causal = torch.tril(torch.ones((L, L), dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    attn = (same & causal)[:, None]  # (B, 1, L, L)
    attn = attn | torch.eye(L, dtype=torch.bool)[None, None]  # padding rows attend to themselves (no NaN)
    return TokenBatch(ids, attn, target, pos)


def make_micro_batches(examples: list[SFTExample], batch_size: int, pad_id: int,
                       packing: bool = False, pack_length: int = 512) -> list[TokenBatch]:
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    if packing:
        return [pack_sft(c, pad_id, pack_length) for c in chunks]
    return [collate_sft(c, pad_id) for c in chunks]


@dataclass
class PreferencePair:
    """Token ids of one pair; both completions end with the end-of-turn token."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def tokenize_preference(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                        max_completion_tokens: int, on_invalid: str = "error",
                        report: LoadReport | None = None) -> list[PreferencePair]:
    """Tokenize preference rows; over-long prompts are an error (or skipped), long completions truncated; a pair
    whose completions are the same tokens after truncation is an error (or skipped, counted)."""
    out = []
    for row in rows:
        p_ids = prompt_ids_within_limit(row, row.data["prompt"], tokenizer, fmt, max_prompt_tokens, on_invalid, report)
        if p_ids is None:
            continue
        chosen, rejected = [encode_completion(tokenizer, row.data[k], max_completion_tokens, report, k)
                            for k in ("chosen", "rejected")]
        if chosen == rejected:  # different texts that agree on their first max_completion_tokens tokens
            if on_invalid != "skip":
                raise DataError(row.file, row.line, "rejected", "identical to 'chosen' after truncation to "
                                f"data.max_completion_tokens={max_completion_tokens} (a zero-gradient pair)")
            if report is not None:
                report.skip("chosen and rejected identical after truncation to data.max_completion_tokens")
            continue
        out.append(PreferencePair(p_ids, chosen, rejected))
    return out


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> TokenBatch:
    """(2B, L) right-padded rows: the B chosen completions, then the B rejected ones, targets on completions."""
    return collate_sft([SFTExample(p.prompt_ids, p.chosen_ids) for p in pairs]
                       + [SFTExample(p.prompt_ids, p.rejected_ids) for p in pairs], pad_id)


@dataclass
class StepExample:
    """Token ids of one row; ``positions[k]`` indexes step k's last token in ``completion_ids``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    positions: list[int]
    labels: list[float]


@dataclass
class StepBatch:
    """Right-padded rows (B, L) and their steps (B, S): absolute token positions, labels, 0/1 mask."""

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor
    labels: Tensor
    mask: Tensor

    def to(self, device) -> "StepBatch":
        return StepBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.positions,
                                                   self.labels, self.mask)))


def step_example(tokenizer, prompt_ids: list[int], completion_ids: list[int], step_ends: Sequence[int],
                 labels: Sequence[float]) -> StepExample:
    """Place steps ending at characters ``step_ends`` of the decoded completion on its tokens; steps past
    the (possibly truncated) completion's text are dropped with their labels."""
    ends = token_char_ends(tokenizer, completion_ids)
    kept = [(e, y) for e, y in zip(step_ends, labels) if ends and e <= ends[-1]]
    positions = step_end_positions([(0, e) for e, _ in kept], ends) if kept else []
    return StepExample(prompt_ids, completion_ids, positions, [float(y) for _, y in kept])


def tokenize_steps(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                   max_completion_tokens: int, separator: str, on_invalid: str = "error",
                   report: LoadReport | None = None) -> list[StepExample]:
    """Step rows -> examples; over-long prompts are an error (or skipped); steps cut off by truncation are
    dropped (counted), and a row left without steps is skipped (counted)."""
    out = []
    for row in rows:
        p_ids = prompt_ids_within_limit(row, row.data["prompt"], tokenizer, fmt, max_prompt_tokens, on_invalid, report)
        if p_ids is None:
            continue
        steps = row.data["steps"]
        step_ends = [sum(len(s) for s in steps[:k + 1]) + k * len(separator) for k in range(len(steps))]
        c_ids = encode_completion(tokenizer, separator.join(steps), max_completion_tokens, report, "steps")
        ex = step_example(tokenizer, p_ids, c_ids, step_ends, row.data["labels"])
        if report is not None and len(ex.labels) < len(steps):
            report.skip("steps past data.max_completion_tokens dropped")
        if ex.labels:
            out.append(ex)
    return out


def collate_steps(examples: Sequence[StepExample], pad_id: int) -> StepBatch:
    tokens = collate_sft([SFTExample(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    S = max(len(e.labels) for e in examples)
    positions = torch.zeros((len(examples), S), dtype=torch.long)
    labels = torch.zeros((len(examples), S))
    mask = torch.zeros((len(examples), S), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.labels)
        positions[i, :n] = torch.tensor(e.positions) + len(e.prompt_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
    return StepBatch(tokens.input_ids, tokens.attention_mask, positions, labels, mask)
