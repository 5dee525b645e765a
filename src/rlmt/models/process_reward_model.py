"""A trained process reward model: a causal-LM trunk and a :class:`~rlmt.models.heads.ProcessHead` read at
each step's last token, and its ``final/`` directory (written by ``algorithm: process_reward_model``, read
by the ``process_reward_model`` reward source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from rlmt.data.batches import StepBatch, StepExample, collate_steps
from rlmt.data.tokenize import PromptFormat
from rlmt.models.heads import ProcessHead
from rlmt.models.loading import load_model
from rlmt.records import write_atomic
from rlmt.rollout.logprobs import position_ids_from_mask


HEAD_FILE = "process_head.pt"


META_FILE = "process_reward_model.json"


def step_logits(model: nn.Module, head: nn.Module, batch: StepBatch) -> Tensor:
    """(B, S) step logits: the head on the final hidden state at each step's last token (one trunk pass)."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=position_ids_from_mask(batch.attention_mask),
                                 use_cache=False).last_hidden_state  # (B, L, H)
    h = hidden.gather(1, batch.positions[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, S, H)
    return head(h)


@torch.no_grad()
def step_scores(model: nn.Module, head: nn.Module, examples: Sequence[StepExample], batch_size: int, pad_id: int,
                device) -> list[list[float]]:
    """sigmoid step scores of every example (eval mode, no grad), one list per example."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        b = collate_steps(chunk, pad_id).to(device)
        p = torch.sigmoid(step_logits(model, head, b)).cpu()
        out += [p[j, :len(e.labels)].tolist() for j, e in enumerate(chunk)]
    model.train(was_training)
    return out


def save_process_head(target: Path, head: nn.Module, separator: str, aggregate: str, fmt: PromptFormat) -> None:
    """Write ``process_head.pt`` and ``process_reward_model.json`` into ``target`` (a ``final/`` directory)."""
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, target / HEAD_FILE)
    meta = {"format": 1, "separator": separator, "aggregate": aggregate, "chat": fmt.chat,
            "system_prompt": fmt.system_prompt, "hidden_size": int(head.linear.in_features)}
    write_atomic(target / META_FILE, json.dumps(meta, indent=1))


def load_process_reward_model(path: str | Path, device: str = "cpu"):
    """(LoadedModel, ProcessHead, meta dict) from a ``final/`` directory written by this trainer."""

    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"{path}: not a process reward model (no {META_FILE}); train one with "
                                "algorithm: process_reward_model")
    meta = json.loads((path / META_FILE).read_text())
    lm = load_model(str(path), device=device)
    lm.model.eval().requires_grad_(False)
    head = ProcessHead(lm.model.config.hidden_size)
    head.load_state_dict(torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True))
    return lm, head.to(device).eval(), meta
