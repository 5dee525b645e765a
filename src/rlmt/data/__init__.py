"""Reading, validating and tokenizing rows, and collating them into token batches.

- :mod:`rlmt.data.sources`: where rows come from (JSONL, JSON, CSV, Parquet/Arrow, ``save_to_disk``
  directories, hub datasets), the column mapping, and errors that name the file, line (or row) and field;
- :mod:`rlmt.data.rows`: the row kinds, read and validated;
- :mod:`rlmt.data.tokenize`: the prompt format, prompt and completion ids, SFT examples;
- :mod:`rlmt.data.batches`: padded and packed SFT batches, preference pairs, step-labelled rows.
"""

from rlmt.data.batches import (PreferencePair, StepBatch, StepExample, TokenBatch, collate_pairs, collate_sft,
                               collate_steps, make_micro_batches, pack_sft, step_example, tokenize_preference,
                               tokenize_steps)
from rlmt.data.order import epoch_order, step_indices
from rlmt.data.rows import FieldCheck, LoadReport, Row, RowKind, check_fields, load_rows, validate_row
from rlmt.data.sources import DataError, Origin, SourceOptions, is_hub_dataset_id, open_source
from rlmt.data.tokenize import (PromptFormat, SFTExample, check_prompt_lengths, completion_end_ids,
                                encode_completion, encode_prompt, prompt_ids_within_limit, split_sft_row,
                                token_char_ends, tokenize_sft)

__all__ = ["DataError", "FieldCheck", "LoadReport", "Origin", "PreferencePair", "PromptFormat", "Row", "RowKind",
           "SFTExample", "SourceOptions", "StepBatch", "StepExample", "TokenBatch", "check_fields",
           "check_prompt_lengths", "collate_pairs", "collate_sft", "collate_steps", "completion_end_ids",
           "encode_completion", "encode_prompt", "epoch_order", "is_hub_dataset_id", "load_rows",
           "make_micro_batches", "open_source", "pack_sft", "prompt_ids_within_limit", "split_sft_row",
           "step_example", "step_indices", "token_char_ends", "tokenize_preference", "tokenize_sft", "tokenize_steps",
           "validate_row"]
