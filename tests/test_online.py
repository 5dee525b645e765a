"""The online loop (REINFORCE, GRPO) on a tiny model: the update equals an independently computed
gradient, is accumulation-invariant, and rewards/advantages behave as specified."""

import copy
import json

import pytest
import torch

from rlmt.config import load_config
from rlmt.data import PromptFormat, encode_prompt
from rlmt.models import load_model
from rlmt.records import read_metrics
from rlmt.rollout import SamplingParams, generate
from rlmt.train.estimators import advantages_for
from rlmt.train.experience import Advantages, Experience, UpdateContext
from rlmt.train.methods import METHODS
from rlmt.train.update import policy_gradient_update
from rlmt.train.runner import train


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def rollout(lm):
    fmt = PromptFormat()
    prompts = [encode_prompt(lm.tokenizer, fmt, p) for p in ("hello", "what is 2+2", "say a word")]
    return generate(lm.model, lm.tokenizer, prompts, SamplingParams(4, 1.0, max_new_tokens=6),
                    torch.Generator().manual_seed(0))


def _sgd_update(model, cfg, batch, adv, ref_lp=None, autocast=None):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    ctx = UpdateContext(model, None, model, opt, sched, cfg, {}, None, METHODS[cfg.algorithm], autocast)
    exp = Experience(batch, torch.zeros(len(batch.texts)), batch.response_mask, ref_lp, cfg.rollout.num_samples, 1.0)
    metrics = policy_gradient_update(ctx, exp, Advantages(adv))
    return [p.detach() - b for p, b in zip(model.parameters(), before)], metrics


def _independent_logprobs(model, batch):
    """log pi of the response tokens from a plain full forward (no chunking, no helpers)."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    logp = torch.log_softmax(logits.float(), -1)[:, batch.prompt_len - 1:-1]
    return logp.gather(-1, batch.response_ids[:, :, None]).squeeze(-1)


def _cfg(algorithm, **kw):
    over = [f"algorithm={algorithm}", "model.name=tiny-random", "optim.max_grad_norm=0", "pg.beta=0",
            "rollout.num_samples=4"]
    return load_config(None, over + [f"{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("algorithm", ["grpo", "reinforce"])
def test_update_equals_independent_gradient(lm, rollout, algorithm):
    cfg = _cfg(algorithm, **{"optim.batch_size": 12, "pg.aggregation": "token_mean"})
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0])
    adv, _ = advantages_for(rewards, 4, cfg.pg, None)
    delta, metrics = _sgd_update(lm.model, cfg, rollout, adv)
    model = copy.deepcopy(lm.model)
    lp = _independent_logprobs(model, rollout)
    m = rollout.response_mask.float()
    if algorithm == "grpo":  # at the first epoch ratio == 1, so the clipped surrogate is -A * ratio
        ratio = torch.exp(lp - rollout.logprobs)
        loss = -(adv[:, None] * ratio * m).sum() / m.sum()
    else:
        loss = -(adv[:, None] * lp * m).sum() / m.sum()
    loss.backward()
    for d, p in zip(delta, model.parameters()):
        assert torch.allclose(d, -p.grad, atol=1e-6, rtol=1e-4)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    if algorithm == "grpo":
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["clip_frac"] == 0.0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_online_update_is_accumulation_invariant(lm, rollout, aggregation):
    adv = torch.linspace(-1, 1, 12)
    ref_lp = rollout.logprobs - 0.1  # a KL term too
    one, _ = _sgd_update(lm.model, _cfg("grpo", **{"optim.batch_size": 12, "pg.aggregation": aggregation,
                                                    "pg.beta": 0.1}), rollout, adv, ref_lp)
    many, _ = _sgd_update(lm.model, _cfg("grpo", **{"optim.batch_size": 5, "pg.aggregation": aggregation,
                                                     "pg.beta": 0.1}), rollout, adv, ref_lp)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_zero_variance_groups_do_not_move_the_policy(lm, rollout):
    cfg = _cfg("grpo")
    adv, _ = advantages_for(torch.tensor([1.0] * 4 + [0.0] * 4 + [0.5] * 4), 4, cfg.pg, None)
    assert torch.equal(adv, torch.zeros(12))
    delta, _ = _sgd_update(lm.model, cfg, rollout, adv)
    assert all((d == 0).all() for d in delta)


def test_running_mean_baseline_uses_the_previous_batch():
    cfg = _cfg("reinforce", **{"pg.advantage": "running_mean", "pg.baseline_momentum": 0.5})
    a1, b1 = advantages_for(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, cfg.pg, None)
    assert torch.allclose(a1, torch.tensor([1.0, 0.0, 1.0, 1.0])) and b1 == pytest.approx(0.75)
    a2, b2 = advantages_for(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2, cfg.pg, b1)
    assert torch.allclose(a2, torch.tensor([-0.75, 0.25, 0.0, 0.25]))  # unscored -> advantage 0
    assert b2 == pytest.approx(0.5 * 0.75 + 0.5 * (2 / 3))


def _prompt_file(tmp_path):
    rows = [{"prompt": f"Write a word with letter {c}", "answer": c} for c in "abcdefgh"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("algorithm,extra", [
    ("grpo", []),
    ("grpo", ["pg.kl_in_reward=true", "pg.epochs=2", "pg.minibatches=2"]),
    ("reinforce", ["pg.advantage=leave_one_out", "pg.beta=0"]),
])
def test_end_to_end_from_config(tmp_path, algorithm, extra):
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(f"""
algorithm: {algorithm}
model: {{name: tiny-random}}
data: {{train: {_prompt_file(tmp_path)}}}
rollout: {{num_samples: 4, batch_prompts: 2, max_new_tokens: 6, temperature: 1.0}}
reward: {{source: regex, args: {{pattern: "[a-m]"}}}}
optim: {{max_steps: 3, lr: 1.0e-3, batch_size: 4}}
run: {{output_dir: {tmp_path / 'run'}, progress: false, save_every: 2}}
""")
    run = train(load_config(yaml_path, extra))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["groups/zero_variance"] <= 2
        assert "loss" in r and r["skipped_steps"] == 0
    if algorithm == "grpo" and not extra:
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first step
        assert rows[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # sampler log-probs reused as pi_old
    assert (run / "final" / "config.json").exists() and (run / "checkpoints" / "step-3").exists()


def test_bad_reward_source_is_a_clear_error(tmp_path):
    from rlmt.data import DataError

    cfg = load_config(None, ["algorithm=grpo", "model.name=tiny-random", f"data.train={_prompt_file(tmp_path)}",
                             "reward.source=math_answer", "reward.args={answer_field: missing_field}",
                             f"run.output_dir={tmp_path / 'run'}", "optim.max_steps=1", "rollout.num_samples=2",
                             "rollout.max_new_tokens=4", "run.progress=false"])
    with pytest.raises(DataError, match="field 'missing_field': missing \\(reward source 'math_answer' reads it\\)"):
        train(cfg)  # checked with the data, before the model loads
