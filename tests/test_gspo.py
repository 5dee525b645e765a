"""GSPO: the sequence-level clipped surrogate against hand-computed values and gradients, its split
invariance inside the shared update, and a run from a config (a new online method is a table row plus its
pure objective)."""

import copy
import json
import math

import pytest
import torch

from rlmt.config import load_config
from rlmt.data import PromptFormat, encode_prompt
from rlmt.models import load_model
from rlmt.objectives.policy import gspo_loss
from rlmt.records import read_metrics
from rlmt.rollout import SamplingParams, generate
from rlmt.train.experience import Advantages, Experience, UpdateContext
from rlmt.train.methods import METHODS
from rlmt.train.runner import train
from rlmt.train.update import policy_gradient_update

LP = [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
OLD = [[-1.2, -1.8, 0.0], [-0.7, 0.0, 0.0]]
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_sequence_ratio_loss_and_gradient_by_hand():
    # sequence 0: mean log-ratio (0.2 - 0.2) / 2 = 0 -> s0 = 1; sequence 1: 0.2 -> s1 = e^0.2 = 1.2214
    # A = (1, -1), eps = 0.2: l0 = -1 * 1; l1 = max(1.2214, 1.2) = 1.2214 (A < 0: the high side is not clipped)
    lp = torch.tensor(LP, requires_grad=True)
    loss, met = gspo_loss(lp, torch.tensor(OLD), torch.tensor([1.0, -1.0]), MASK, clip_eps=0.2)
    s1 = math.exp(0.2)
    assert float(loss) == pytest.approx((-1.0 + s1) / 2, abs=1e-6)  # seq_mean over the 2 sequences
    loss.backward()
    # d l_i / d lp_t = -A_i s_i / n_i while unclipped, then / S = 2; nothing on padding
    want = torch.tensor([[-0.25, -0.25, 0.0], [s1 / 2, 0.0, 0.0]])
    assert torch.allclose(lp.grad, want, atol=1e-6)
    assert met["clip_frac"] == 0.0
    assert met["seq_ratio_max"] == pytest.approx(s1, abs=1e-6) and met["seq_ratio_min"] == pytest.approx(1.0)


def test_a_clipped_sequence_gets_no_gradient_and_counts_once():
    lp = torch.tensor(LP, requires_grad=True)
    loss, met = gspo_loss(lp, torch.tensor(OLD), torch.tensor([1.0, 1.0]), MASK, clip_eps=0.2)
    assert float(loss) == pytest.approx((-1.0 - 1.2) / 2, abs=1e-6)  # l1 = max(-1.2214, -1.2) = -1.2
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -0.25, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert met["clip_frac"] == pytest.approx(0.5) and met["clip_frac_high"] == pytest.approx(0.5)


def test_token_mean_weighs_sequences_by_length_and_a_global_normalizer_splits():
    lp, old, adv = torch.tensor(LP), torch.tensor(OLD), torch.tensor([1.0, -1.0])
    s1 = math.exp(0.2)
    loss, _ = gspo_loss(lp, old, adv, MASK, clip_eps=0.2, aggregation="token_mean")
    assert float(loss) == pytest.approx((2 * -1.0 + 1 * s1) / 3, abs=1e-6)
    whole, _ = gspo_loss(lp, old, adv, MASK, clip_eps=0.2, normalizer=2)
    parts = sum(float(gspo_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], MASK[i:i + 1], 0.2, normalizer=2)[0])
                for i in range(2))
    assert parts == pytest.approx(float(whole), abs=1e-7)


def test_a_sequence_without_tokens_adds_nothing():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    loss, met = gspo_loss(torch.tensor(LP), torch.tensor(OLD), torch.tensor([1.0, 5.0]), mask, 0.2)
    assert float(loss) == pytest.approx(-1.0, abs=1e-6) and met["seq_ratio_mean"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def _sgd(model, cfg, batch, adv):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    ctx = UpdateContext(model, None, model, opt, sched, cfg, {}, None, METHODS["gspo"])
    exp = Experience(batch, torch.zeros(len(batch.texts)), batch.response_mask, None, 4, 1.0)
    metrics = policy_gradient_update(ctx, exp, Advantages(adv))
    return [p.detach() - b for p, b in zip(model.parameters(), before)], metrics


def test_gspo_update_equals_the_sequence_level_gradient_and_does_not_depend_on_the_split(lm):
    fmt = PromptFormat()
    prompts = [encode_prompt(lm.tokenizer, fmt, p) for p in ("hello", "what is 2+2", "say a word")]
    batch = generate(lm.model, lm.tokenizer, prompts, SamplingParams(4, 1.0, max_new_tokens=6),
                     torch.Generator().manual_seed(0))
    adv = torch.linspace(-1, 1, 12)
    over = ["algorithm=gspo", "model.name=tiny-random", "optim.max_grad_norm=0", "pg.beta=0", "rollout.num_samples=4"]
    whole, met = _sgd(lm.model, load_config(None, over + ["optim.batch_size=12"]), batch, adv)
    split, _ = _sgd(lm.model, load_config(None, over + ["optim.batch_size=4"]), batch, adv)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # at pi = pi_old every s_i = 1: the gradient is -(1/S) sum_i A_i / n_i sum_t grad log pi_t
    model = copy.deepcopy(lm.model)
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    lp = torch.log_softmax(logits.float(), -1)[:, batch.prompt_len - 1:-1]
    lp = lp.gather(-1, batch.response_ids[:, :, None]).squeeze(-1)
    m = batch.response_mask.float()
    loss = -(adv * (lp * m).sum(-1) / m.sum(-1)).sum() / 12
    loss.backward()
    for d, p in zip(whole, model.parameters()):
        assert torch.allclose(d, -p.grad, atol=1e-6, rtol=1e-4)
    assert met["seq_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and met["clip_frac"] == 0.0


def test_gspo_runs_from_a_config(tmp_path):
    rows = [{"prompt": f"Write a word with letter {c}", "answer": c} for c in "abcdefgh"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["algorithm=gspo", "model.name=tiny-random", f"data.train={data}",
                             "rollout.num_samples=4", "rollout.batch_prompts=2", "rollout.max_new_tokens=6",
                             "reward.source=regex", "reward.args={pattern: '[a-m]'}", "optim.max_steps=2",
                             "optim.lr=1e-3", "optim.batch_size=4", f"run.output_dir={tmp_path / 'run'}",
                             "run.progress=false"])
    assert cfg.pg.aggregation == "seq_mean" and cfg.pg.kl_estimator == "k3"  # GSPO's conventions
    rows = read_metrics(train(cfg))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["seq_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
