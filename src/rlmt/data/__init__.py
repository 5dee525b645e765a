"""Reading, validating and tokenizing rows, and collating them into token batches.

- :mod:`rlmt.data.rows`: the row kinds, read from JSONL (or any file ``datasets`` reads) and validated, with
  errors that name the file, line and field;
- :mod:`rlmt.data.tokenize`: the prompt format, prompt and completion ids, SFT examples;
- :mod:`rlmt.data.batches`: padded and packed SFT batches, preference pairs, step-labelled rows.
"""

from rlmt.data.batches import (PreferencePair, StepBatch, StepExample, TokenBatch, collate_pairs, collate_sft,
                               collate_steps, make_micro_batches, pack_sft, step_example, tokenize_preference,
                               tokenize_steps)
from rlmt.data.order import epoch_order, step_indices
from rlmt.data.rows import DataError, FieldCheck, LoadReport, Row, RowKind, check_fields, load_rows, validate_row
from rlmt.data.tokenize import (PromptFormat, SFTExample, check_prompt_lengths, completion_end_ids,
                                encode_completion, encode_prompt, prompt_ids_within_limit, split_sft_row,
                                token_char_ends, tokenize_sft)

__all__ = ["DataError", "FieldCheck", "LoadReport", "PreferencePair", "PromptFormat", "Row", "RowKind", "SFTExample", "StepBatch",
           "StepExample", "TokenBatch", "check_fields", "check_prompt_lengths", "collate_pairs", "collate_sft", "collate_steps",
           "completion_end_ids", "encode_completion", "encode_prompt", "epoch_order", "load_rows", "make_micro_batches", "pack_sft",
           "prompt_ids_within_limit", "split_sft_row", "step_example", "step_indices", "token_char_ends", "tokenize_preference",
           "tokenize_sft", "tokenize_steps", "validate_row"]
