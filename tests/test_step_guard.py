"""A NaN or -inf log-prob inside a real training run: the step guard skips that optimizer step (nothing
applied: weights and AdamW state as before it), counts it in the metrics, and training goes on.

The training forward is wrapped for one call so that one response token's log-prob is NaN (the gradient
still flows through the others) or -inf (as ``log_softmax`` gives for a token whose logit underflowed: a
finite gradient, so a guard that looks at the gradient alone lets it through; under GRPO's clipped ratio
``exp(-inf) = 0`` even the loss stays finite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rlmt.train.sft as sft
import rlmt.train.update as update
from rlmt.cli import main
from rlmt.records import read_metrics
from rlmt.tasks import write_addition_split
from rlmt.train.experience import group_rows


def _poison(lp: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``lp`` with its first token under ``mask`` set to ``value``: NaN added (gradient flows through the rest),
    -inf filled (zero gradient there, finite elsewhere)."""
    at = torch.zeros_like(mask, dtype=torch.bool)
    b, t = mask.nonzero()[0].tolist()
    at[b, t] = True
    if math.isnan(value):
        return lp + torch.where(at, torch.full_like(lp, value), torch.zeros_like(lp))
    return lp.masked_fill(at, value)


def _poisoned_on_call(real, k: int, value: float, mask_of):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        lp = real(*args, **kwargs)
        calls["n"] += 1
        return _poison(lp, mask_of(*args), value) if calls["n"] == k else lp

    return wrapped


def _weights_and_adam_steps(ckpt: Path) -> tuple[dict, list]:
    from safetensors.torch import load_file

    model = load_file(ckpt / "model.safetensors")
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    return model, [float(s["step"]) for s in opt["state"].values()]


def _assert_step_2_skipped_and_training_continued(run: Path, counted: bool) -> None:
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["skipped_steps"] for r in rows] == [0.0, 1.0, 0.0]
    if counted:
        assert [r["nonfinite_logprobs"] for r in rows] == [0.0, 1.0, 0.0]
    assert all(math.isfinite(rows[i]["loss"]) for i in (0, 2))
    w1, s1 = _weights_and_adam_steps(run / "checkpoints" / "step-1")
    w2, s2 = _weights_and_adam_steps(run / "checkpoints" / "step-2")
    w3, s3 = _weights_and_adam_steps(run / "checkpoints" / "step-3")
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and s1 == s2  # nothing applied at step 2
    assert any(not torch.equal(w2[k], w3[k]) for k in w2) and s3 == [x + 1 for x in s2]  # step 3 trained
    assert all(torch.isfinite(v).all() for v in w3.values())


@pytest.mark.parametrize("value", [float("nan"), -math.inf], ids=["nan", "-inf"])
def test_grpo_step_with_a_nonfinite_logprob_is_skipped_and_counted(tmp_path, monkeypatch, value):
    train, _ = write_addition_split(tmp_path, 8, 2)

    def mask_of(model, batch, groups, group_size, *rest):
        return batch.response_mask[group_rows(groups, group_size)]

    # one micro-batch per step (batch_size 8 = 2 prompts x 4 samples): call k is step k's update forward
    monkeypatch.setattr(update, "response_logprobs", _poisoned_on_call(update.response_logprobs, 2, value, mask_of))
    out = tmp_path / "run"
    assert main(["train", "algorithm=grpo", "model.name=tiny-random", f"data.train={train}", "optim.max_steps=3",
                 "rollout.num_samples=4", "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "optim.batch_size=8",
                 "optim.lr=1e-3", "pg.beta=0", "reward.source=regex", "reward.args={pattern: '[0-9]'}",
                 "run.save_every=1", "run.keep_checkpoints=3", "run.progress=false", f"run.output_dir={out}"]) == 0
    _assert_step_2_skipped_and_training_continued(out, counted=True)


@pytest.mark.parametrize("value", [float("nan"), -math.inf], ids=["nan", "-inf"])
def test_sft_step_with_a_nonfinite_logprob_is_skipped_and_counted(tmp_path, monkeypatch, value):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i} {i * 7}"}) + "\n" for i in range(8)))

    def mask_of(model, input_ids, attention_mask, target_mask, *rest):
        return target_mask

    # one micro-batch per step (grad_accum 1): call k is step k's forward
    monkeypatch.setattr(sft, "token_logprobs", _poisoned_on_call(sft.token_logprobs, 2, value, mask_of))
    out = tmp_path / "run"
    assert main(["train", "algorithm=sft", "model.name=tiny-random", f"data.train={data}", "optim.max_steps=3",
                 "optim.batch_size=2", "optim.lr=1e-3", "run.save_every=1", "run.keep_checkpoints=3",
                 "run.progress=false", f"run.output_dir={out}"]) == 0
    _assert_step_2_skipped_and_training_continued(out, counted=True)


def test_guarded_step_skips_a_step_whose_loss_was_not_finite():
    from rlmt.config import OptimConfig
    from rlmt.train.optim import build_optimizer, guarded_step

    model = torch.nn.Linear(2, 1)
    opt, sched = build_optimizer(model, OptimConfig(lr=0.1), 10)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 2)).sum().backward()  # a finite gradient
    out = guarded_step(model, opt, sched, 1.0, finite=False)
    assert out["skipped_steps"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert sched.last_epoch == 1  # the schedule keeps counting steps
