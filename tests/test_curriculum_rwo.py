"""Curriculum (pass-rate-weighted prompt draws) and return-weighted optimization (RL + lambda * NLL)."""

import copy
import json
import math

import pytest
import torch

from rlmt.config import load_config
from rlmt.curriculum import curriculum_weights, draw_prompts, update_pass_rates
from rlmt.records import read_metrics
from rlmt.train.runner import train


def test_weights_favour_prompts_that_still_vary():
    rates = torch.tensor([float("nan"), 0.0, 1.0, 0.5, 0.9])
    w = curriculum_weights(rates, floor=0.01)
    assert torch.allclose(w, torch.tensor([0.26, 0.01, 0.01, 0.26, 0.1]))  # p(1-p) + floor, unseen = 1/2
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(400):
        counts[draw_prompts(w, 1, g)] += 1
    assert counts[0] > counts[4] > counts[1] and counts[3] > counts[2]
    assert len(set(draw_prompts(w, 5, g))) == 5  # without replacement


def test_pass_rate_ema():
    rates = torch.tensor([float("nan"), 0.5])
    out = update_pass_rates(rates, torch.tensor([0, 1]), torch.tensor([0.25, 1.0]), momentum=0.5)
    assert torch.allclose(out, torch.tensor([0.25, 0.75]))  # first sight sets p; then EMA
    assert torch.isnan(rates[0])  # pure: input untouched


def _files(tmp_path):
    prompts = [{"prompt": f"Write a word with letter {c}", "answer": c} for c in "abcdefgh"]
    demos = [{"prompt": f"Write a word with letter {c}", "completion": f"{c}at", "reward": float(i % 2)}
             for i, c in enumerate("abcd")]
    for name, rows in (("p.jsonl", prompts), ("d.jsonl", demos)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "p.jsonl", tmp_path / "d.jsonl"


def test_curriculum_and_return_weighted_end_to_end(tmp_path):
    p, d = _files(tmp_path)
    run = train(load_config(None, [
        "algorithm=grpo", "model.name=tiny-random", f"data.train={p}", f"data.demonstrations={d}",
        "pg.curriculum=true", "pg.nll_coef=0.5", "pg.nll_tau=0.5", "rollout.num_samples=4", "rollout.batch_prompts=2",
        "rollout.max_new_tokens=5", "reward.source=regex", "reward.args={pattern: '[a-m]'}", "optim.max_steps=4",
        f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.save_every=2"]))
    rows = read_metrics(run)
    assert [r["curriculum/seen"] for r in rows] == sorted(r["curriculum/seen"] for r in rows)
    assert rows[-1]["curriculum/seen"] >= 2 and all(r["demo/nll"] > 0 for r in rows)
    state = json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["update"]["demo_draws"] == 4 and len(state["pass_rates"]) == 8


def test_demonstration_gradient_is_lambda_times_weighted_nll(tmp_path):
    """With zero advantages (all-equal rewards) the whole update is lambda * grad of the weighted NLL."""
    from rlmt.data import PromptFormat, encode_prompt
    from rlmt.models import load_model
    from rlmt.objectives.policy import return_weights
    from rlmt.rollout import SamplingParams, generate
    from rlmt.train.experience import Experience, UpdateContext
    from rlmt.train.methods import METHODS, update_step
    from rlmt.train.update import load_demonstrations
    from rlmt.rewards import build_reward_source

    _, d = _files(tmp_path)
    cfg = load_config(None, ["algorithm=grpo", "model.name=tiny-random", f"data.demonstrations={d}", "pg.beta=0",
                             "pg.nll_coef=0.5", "pg.nll_tau=0.5", "optim.batch_size=4", "optim.max_grad_norm=0",
                             "rollout.num_samples=2"])
    lm = load_model("tiny-random")
    fmt = PromptFormat()
    demos = load_demonstrations(cfg, lm.tokenizer, fmt, build_reward_source("regex", {"pattern": "x"}))
    batch = generate(lm.model, lm.tokenizer, [encode_prompt(lm.tokenizer, fmt, "hi")], SamplingParams(2, 1.0, max_new_tokens=4),
                     torch.Generator().manual_seed(0))
    model = copy.deepcopy(lm.model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ctx = UpdateContext(model, None, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg, {}, demos,
                        METHODS["grpo"])
    before = [p.detach().clone() for p in model.parameters()]
    update_step(ctx, Experience(batch, torch.ones(2), batch.response_mask, None, 2, 1.0))

    ref = copy.deepcopy(lm.model)
    from rlmt.data import step_indices
    idx = step_indices(0, 4, 4, cfg.run.seed + 1, True)
    w = return_weights(torch.tensor([float(i % 2) for i in range(4)])[idx], 0.5)
    total_nll, n_tok = 0.0, 0
    for j, i in enumerate(idx):  # independent: one plain forward per demonstration
        e = demos.examples[i]
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        logp = torch.log_softmax(ref(ids).logits.float(), -1)[0]
        for t, tok in enumerate(e.completion_ids):
            total_nll = total_nll - w[j] * logp[len(e.prompt_ids) + t - 1, tok]
            n_tok += 1
    (0.5 * total_nll / n_tok).backward()
    for p, b, r in zip(model.parameters(), before, ref.parameters()):
        assert torch.allclose(p.detach() - b, -r.grad, atol=1e-6, rtol=1e-4)
    assert math.isclose(w.mean().item(), 1.0, rel_tol=1e-6)
