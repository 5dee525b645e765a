"""A trained outcome reward model: a causal-LM trunk and a :class:`~rlmt.models.heads.RewardHead`, scored
at the last token of prompt + completion, and its ``final/`` directory (written by ``algorithm:
reward_model``, read by the ``reward_model`` reward source)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from rlmt.data.batches import collate_sft
from rlmt.data.tokenize import PromptFormat, SFTExample
from rlmt.models.heads import RewardHead
from rlmt.models.loading import load_model, pick_device, save_final
from rlmt.records import write_atomic
from rlmt.rollout.logprobs import position_ids_from_mask


HEAD_FILE = "reward_head.pt"


META_FILE = "reward_model.json"


def last_token_hidden(trunk: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L) right-padded ids and 0/1 mask -> (B, H) final hidden state at each row's last real token.

    Runs the trunk's decoder only (no full-vocabulary logits).
    """
    h = trunk.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    last = attention_mask.long().sum(-1) - 1  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)


class RewardModel(nn.Module):
    """A causal-LM ``trunk`` and a :class:`RewardHead`; ``forward(ids, mask) -> (B,)`` raw scores.

    ``score_mean`` / ``score_std`` (None when not stored) are the train-set statistics for z-scores;
    ``tokenizer`` and ``prompt_format`` are what the model was trained with (set by the loader).
    """

    def __init__(self, trunk: nn.Module, head: RewardHead, tokenizer=None,
                 prompt_format: PromptFormat | None = None, score_mean: float | None = None,
                 score_std: float | None = None, max_completion_tokens: int | None = None):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()
        self.score_mean, self.score_std = score_mean, score_std
        self.max_completion_tokens = max_completion_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(last_token_hidden(self.trunk, input_ids, attention_mask))  # (B,)

    @torch.no_grad()
    def score(self, prompt_ids_list: Sequence[list[int]], completion_ids_list: Sequence[list[int]],
              batch_size: int = 16) -> Tensor:
        """Raw scores (B,) float32 on CPU of prompt_i + completion_i, in eval mode, ``batch_size`` at a time."""
        was_training = self.training
        self.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(prompt_ids_list), batch_size):
            examples = [SFTExample(list(p), list(c)) for p, c in
                        zip(prompt_ids_list[i:i + batch_size], completion_ids_list[i:i + batch_size])]
            batch = collate_sft(examples, pad).to(device)
            out.append(self(batch.input_ids, batch.attention_mask).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


def save_reward_model(rm: RewardModel, tokenizer, run_dir: Path, meta: dict, trunk_state: dict | None = None) -> Path:
    """``final/``: the trunk (:func:`save_final`; ``trunk_state``: its whole weights when they are sharded),
    ``reward_head.pt`` and ``reward_model.json`` (last, so a directory with the json is complete)."""
    final = save_final(rm.trunk, tokenizer, run_dir, trunk_state)
    tmp = final / f".{HEAD_FILE}.tmp"
    torch.save({k: v.detach().cpu() for k, v in rm.head.state_dict().items()}, tmp)
    os.replace(tmp, final / HEAD_FILE)
    write_atomic(final / META_FILE, json.dumps(meta, indent=1))
    return final


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> RewardModel:
    """Load a reward model written by ``algorithm: reward_model`` (its ``final/`` directory), in eval mode."""

    path = Path(path)
    if not (path / META_FILE).exists():
        raise ValueError(f"{path}: not a reward model directory (no {META_FILE}; train one with "
                         "algorithm: reward_model)")
    meta = json.loads((path / META_FILE).read_text())
    lm = load_model(str(path), dtype=dtype, device=pick_device(device))
    head = RewardHead(int(meta["hidden_size"]))
    head.load_state_dict(torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True))
    fmt = PromptFormat(chat=bool(meta.get("chat", True)), system_prompt=meta.get("system_prompt"))
    rm = RewardModel(lm.model, head.to(next(lm.model.parameters()).device), lm.tokenizer, fmt,
                     meta.get("score_mean"), meta.get("score_std"), meta.get("max_completion_tokens"))
    return rm.eval().requires_grad_(False)
