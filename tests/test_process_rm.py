"""Process supervision: the step math by hand, step-row validation, a tiny PRM that learns a trivial labelling
and resumes exactly, the reward source against a direct forward, dense rewards placed on the right tokens,
and PPO / REINFORCE token rewards with dense rewards against independent computations."""

import json
import math
import random
import shutil

import pytest
import torch

from rlmt.config import load_config
from rlmt.data import DataError, load_rows
from rlmt.models import load_model, tiny_tokenizer
from rlmt.objectives.process import (agreement, aggregate_steps, majority_rate, process_step_loss, split_steps,
                                     step_end_positions)
from rlmt.records import read_metrics
from rlmt.rewards import build_reward_source, score_checked
from rlmt.train import dense as dense_mod
from rlmt.train.dense import dense_rewards_for, place_token_rewards, ppo_token_rewards, returns_to_go
from rlmt.data import token_char_ends
from rlmt.train.runner import train

T = torch.tensor


# ----------------------------------------------------------------------------------------------- the math


def test_split_steps_and_step_end_positions_by_hand():
    assert split_steps("a\n\nbc\n", "\n") == [("a", 1), ("bc", 5)]  # the empty step between is dropped
    assert split_steps("12 + 7 = 19 | 19 + 5 = 24", " | ") == [("12 + 7 = 19", 11), ("19 + 5 = 24", 25)]
    assert split_steps("  \n", "\n") == []
    # tokens reach characters 2, 4, 4, 7 (the third adds no text, e.g. a special token)
    ends = [2, 4, 4, 7]
    assert step_end_positions([(0, 1), (0, 2), (2, 3), (3, 4), (4, 7)], ends) == [0, 0, 1, 1, 3]
    assert step_end_positions([(0, 9)], ends) == [3]  # past the text: the last token
    with pytest.raises(ValueError):
        step_end_positions([(0, 1)], [])


def test_process_step_loss_by_hand():
    # logits 0 and ln 3 (p = 0.5, 0.75), labels 1 and 0; a padded third step holds NaN
    logits = T([[0.0, math.log(3.0), float("nan")]], requires_grad=True)
    labels, mask = T([[1.0, 0.0, 1.0]]), T([[1, 1, 0]])
    # BCE: -log 0.5 = 0.693147, -log(1 - 0.75) = 1.386294; mean = 1.039721
    loss, m = process_step_loss(logits, labels, mask)
    assert float(loss.detach()) == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)
    assert m["step_accuracy"] == 0.0  # 0.5 is a tie (wrong); 0.75 vs label 0 is wrong
    loss.backward()
    # d/dlogit = (p - y) / n: (0.5 - 1) / 2, (0.75 - 0) / 2, 0 on the pad
    assert torch.allclose(logits.grad, T([[-0.25, 0.375, 0.0]]))
    # normalizer: the optimizer step's total step count (here 4) -> sum / 4, the same under any split
    loss4, _ = process_step_loss(logits.detach(), labels, mask, normalizer=4)
    assert float(loss4) == pytest.approx(float(loss.detach()) / 2, abs=1e-6)
    parts = [process_step_loss(logits.detach()[:, i:i + 1], labels[:, i:i + 1], mask[:, i:i + 1], 2)[0] for i in (0, 1)]
    assert float(sum(parts)) == pytest.approx(float(loss.detach()), abs=1e-6)
    assert agreement(T([0.9, 0.5, 0.2, 0.2]), T([1.0, 1.0, 0.0, 1.0])).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert agreement(T([0.9, 0.5, 0.2, 0.5]), T([1.0, 1.0, 0.0, 0.0]), tie=0.5).tolist() == [1.0, 0.5, 1.0, 0.5]


def test_majority_rate_is_the_better_constant_prediction():
    assert majority_rate(T([1.0, 0.0, 1.0, 1.0])) == 0.75
    assert majority_rate(T([0.0, 0.0, 0.0, 1.0, 0.2])) == pytest.approx(0.8)  # soft label 0.2 is on the 0 side
    assert majority_rate(T([1.0, 0.0])) == 0.5
    assert math.isnan(majority_rate(T([])))


def test_aggregate_steps_by_hand():
    scores = T([[0.9, 0.5, 0.8], [0.6, 0.2, 7.0], [0.3, 0.3, 0.3]])
    mask = T([[1, 1, 1], [1, 1, 0], [0, 0, 0]])  # row 2 has 2 steps (the 7.0 is padding); row 3 none
    expect = {"min": [0.5, 0.2], "product": [0.9 * 0.5 * 0.8, 0.12], "mean": [2.2 / 3, 0.4], "last": [0.8, 0.2]}
    for how, want in expect.items():
        got = aggregate_steps(scores, mask, how)
        assert got[:2].tolist() == pytest.approx(want), how
        assert math.isnan(float(got[2])), how
    with pytest.raises(ValueError, match="unknown step aggregate"):
        aggregate_steps(scores, mask, "max")


def test_returns_to_go_ppo_and_reinforce_token_rewards_by_hand():
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    dense = T([[0.5, 0.0, 0.25, 9.0], [0.0, 1.0, 0.0, 0.0]])  # the 9.0 is off the mask
    assert returns_to_go(dense, mask).tolist() == [[0.75, 0.25, 0.25, 0.0], [1.0, 1.0, 0.0, 0.0]]
    old, ref = T([[-1.0, -2.0, -1.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]), T([[-1.5, -2.0, -0.5, 0.0], [-1.0, -2.0, 0.0, 0.0]])
    score = T([1.0, -1.0])
    # r_t = -0.1 * (old - ref) + [t = last] * 0.5 * score + d_t
    want = [[-0.05 + 0.5, 0.0, 0.05 + 0.5 + 0.25, 0.0], [0.0, -0.1 - 0.5 + 1.0, 0.0, 0.0]]
    got = ppo_token_rewards(score, dense, old, ref, mask, beta=0.1, outcome_coef=0.5)
    assert got.tolist() == [pytest.approx(w) for w in want]
    plain = ppo_token_rewards(score, None, old, ref, mask, beta=0.1, outcome_coef=0.5)  # no dense: coef unused
    assert plain[0].tolist() == pytest.approx([-0.05, 0.0, 1.05, 0.0])
    # REINFORCE: A_t = sum_{t' >= t} (d + [last] * c * R) - b; row 1: G = [1.75, 1.25, 1.25] - b(0.5)
    adv = dense_mod.dense_reinforce_advantages(score, dense, mask, T([0.5, 0.0]), outcome_coef=1.0)
    assert adv.tolist() == [pytest.approx([1.25, 0.75, 0.75, 0.0]), pytest.approx([0.0, 0.0, 0.0, 0.0])]


# ----------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("row,field,message", [
    ({"prompt": "p", "labels": [1]}, "steps", "missing"),
    ({"prompt": "p", "steps": [], "labels": []}, "steps", "non-empty list"),
    ({"prompt": "p", "steps": ["a", " "], "labels": [1, 0]}, "steps", "step 1 must be a non-empty string"),
    ({"prompt": "p", "steps": ["a", "b", "c", "d"], "labels": [1, 0, 1]}, "labels", "3 labels for 4 steps"),
    ({"prompt": "p", "steps": ["a"], "labels": [1.5]}, "labels", "label 0 must be a number in [0, 1]"),
    ({"prompt": "p", "steps": ["a"], "labels": ["yes"]}, "labels", "label 0 must be"),
    ({"steps": ["a"], "labels": [1]}, "prompt", "missing"),
])
def test_step_rows_are_validated_with_file_line_and_field(tmp_path, row, field, message):
    path = tmp_path / "steps.jsonl"
    good = {"prompt": "p", "steps": ["a", "b"], "labels": [True, 0.5]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        load_rows(str(path), "steps")
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, field)
    assert message in e.value.message and f"{path}:2" in str(e.value)
    assert len(load_rows(str(path), "steps", on_invalid="skip").rows) == 1


# ----------------------------------------------------------------------------------------------- training


def _step_rows(path, n, seed):
    """A trivially learnable labelling: a step is correct iff it ends in 'ok'."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        labels = [rng.random() < 0.5 for _ in range(rng.randint(1, 3))]
        steps = [f"s{rng.randint(0, 9)} {'ok' if y else 'no'}" for y in labels]
        lines.append(json.dumps({"prompt": f"q{i}", "steps": steps, "labels": labels}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _prm_config(tmp, run_dir, *extra):
    over = ["algorithm=process_reward_model", "model.name=tiny-random", "data.chat=false",
            f"data.train={_step_rows(tmp / 'train.jsonl', 48, 0)}", f"data.eval={_step_rows(tmp / 'eval.jsonl', 16, 1)}",
            "optim.batch_size=8", "optim.grad_accum=2", "optim.max_steps=8", "optim.lr=1e-2", "rm.step_aggregate=min",
            "run.eval_before_after=true", f"run.output_dir={run_dir}", "run.progress=false", "run.save_every=2",
            "run.keep_checkpoints=5"]
    return load_config(None, over + list(extra))


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prm")
    run_dir = tmp / "run"
    train(_prm_config(tmp, run_dir))
    return tmp, run_dir


def test_training_learns_step_labels_and_resumes_exactly(prm_run):
    tmp, run_dir = prm_run
    before = json.loads((run_dir / "eval-before.json").read_text())
    after = json.loads((run_dir / "eval-after.json").read_text())
    assert before["step_loss"] == pytest.approx(math.log(2), abs=1e-5)  # p = 0.5 everywhere
    # the fresh head ties on every step: half credit each, not 0; the majority rates from the file itself
    held = [json.loads(line) for line in (tmp / "eval.jsonl").read_text().splitlines()]
    labels = [y for r in held for y in r["labels"]]
    solved = [all(r["labels"]) for r in held]
    assert before["step_accuracy"] == 0.5 and before["outcome_accuracy"] == 0.5 and before["step_ties"] == 1.0
    assert before["step_accuracy_majority"] == pytest.approx(max(sum(labels), len(labels) - sum(labels)) / len(labels))
    assert before["outcome_accuracy_majority"] == pytest.approx(max(sum(solved), len(solved) - sum(solved)) / len(solved))
    assert after["step_accuracy_majority"] == before["step_accuracy_majority"] and after["step_ties"] < 1.0
    assert after["step_accuracy"] >= 0.9 and after["outcome_accuracy"] >= 0.9
    assert after["step_loss"] < 0.5 * before["step_loss"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    final = run_dir / "final"
    meta = json.loads((final / "process_reward_model.json").read_text())
    assert meta["separator"] == "\n" and meta["aggregate"] == "min" and (final / "process_head.pt").exists()
    assert (run_dir / "checkpoints" / "step-8" / "process_head.pt").exists()

    # resume from step 6 in a copy: the same last metrics row and the same head
    copy_dir = tmp / "resumed"
    shutil.copytree(run_dir, copy_dir)
    shutil.rmtree(copy_dir / "final")
    shutil.rmtree(copy_dir / "checkpoints" / "step-8")
    train(_prm_config(tmp, copy_dir, "run.resume=true"))
    resumed = read_metrics(copy_dir)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    drop = ("time/",)
    same = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in (rows[-1], resumed[-1])]
    assert same[0] == same[1]
    h1 = torch.load(final / "process_head.pt", weights_only=True)
    h2 = torch.load(copy_dir / "final" / "process_head.pt", weights_only=True)
    assert all(torch.equal(h1[k], h2[k]) for k in h1)


# ----------------------------------------------------------------------------------------------- the source


def test_source_scores_equal_a_direct_forward_and_the_aggregate_rules(prm_run):
    _, run_dir = prm_run
    final = str(run_dir / "final")
    source = build_reward_source("process_reward_model", {"path": final, "device": "cpu"})
    rows = [{"prompt": "q1"}, {"prompt": "q2"}, {"prompt": "q3"}]
    responses = ["s1 ok\ns2 no\n", "s3 ok\n\ns4 ok", "\n \n"]
    res = score_checked(source, rows, responses)
    # direct: the trunk over [prompt | response], the head at each step's last character's token
    lm = load_model(final)
    head = torch.load(run_dir / "final" / "process_head.pt", weights_only=True)
    tok = lm.tokenizer
    for i, (row, text) in enumerate(zip(rows[:2], responses[:2])):
        p_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]  # data.chat=false: the plain prompt
        ids = p_ids + tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            h = lm.model.get_decoder()(input_ids=T([ids])).last_hidden_state[0]
        steps = split_steps(text, "\n")
        positions = [len(p_ids) + len(tok(text[:end], add_special_tokens=False)["input_ids"]) - 1 for _, end in steps]
        p = torch.sigmoid(h[positions] @ head["linear.weight"][0] + head["linear.bias"][0])
        assert res.details[i]["step_scores"] == pytest.approx(p.tolist(), abs=1e-5)
        assert res.details[i]["steps"] == [s for s, _ in steps]
        assert res.scores[i] == pytest.approx(float(p.min()), abs=1e-6)
        assert res.token_rewards[i] == [(end, pytest.approx(float(q), abs=1e-5)) for (_, end), q in zip(steps, p)]
    assert res.scores[0] < 0.5 < res.scores[1]  # "no" step vs. all "ok"
    assert res.scores[2] is None and res.token_rewards[2] == [] and res.details[2]["error"] == "no steps"
    s0 = res.details[0]["step_scores"]
    for how, want in {"product": s0[0] * s0[1], "mean": (s0[0] + s0[1]) / 2, "last": s0[1]}.items():
        other = build_reward_source("process_reward_model", {"path": final, "aggregate": how, "dense": False})
        r = other.score(rows[:1], responses[:1])
        assert r.scores[0] == pytest.approx(want, abs=1e-6) and r.token_rewards is None
    with pytest.raises(Exception, match="aggregate"):
        build_reward_source("process_reward_model", {"path": final, "aggregate": "max"})


# ----------------------------------------------------------------------------------------------- dense rewards


def test_place_token_rewards_by_hand():
    tok = tiny_tokenizer()  # one token per ASCII character
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a = tok("ab\ncd", add_special_tokens=False)["input_ids"] + [eos]
    b = tok("xy", add_special_tokens=False)["input_ids"]
    ids = T([a, b + [pad] * 4])
    mask = T([[1] * 6, [1, 1, 0, 0, 0, 0]]).bool()
    assert token_char_ends(tok, a) == [1, 2, 3, 4, 5, 5]  # the end-of-turn token adds no text
    rewards = [[(2, 0.5), (5, 1.0), (99, 2.0)],  # char 2 -> token 1 ('b'); 5 -> 'd' (not the EOS); past -> last
               [(1, 0.25), (1, 0.25)]]  # two rewards on one token add up
    out = place_token_rewards(ids, mask, tok, rewards)
    assert out.tolist() == [[0, 0.5, 0, 0, 1.0, 2.0], [0.5, 0, 0, 0, 0, 0]]
    # a response whose text is shorter than its tokens (cut at a stop string): text 'ab' of tokens 'ab\ncd'
    assert place_token_rewards(ids[:1], mask[:1], tok, [[(2, 1.0)]]).tolist() == [[0, 1.0, 0, 0, 0, 0]]
    # a response without tokens gets nothing
    assert place_token_rewards(ids[:1], torch.zeros_like(mask[:1]), tok, [[(1, 1.0)]]).abs().sum() == 0


def test_dense_rewards_land_on_step_end_tokens_of_a_real_rollout(prm_run):
    from rlmt.data import PromptFormat, encode_prompt
    from rlmt.rollout import SamplingParams, generate

    _, run_dir = prm_run
    lm = load_model("tiny-random")
    tok = lm.tokenizer
    prompts = [encode_prompt(tok, PromptFormat(), p) for p in ("hi", "add 2 and 3")]
    batch = generate(lm.model, tok, prompts, SamplingParams(3, 1.0, max_new_tokens=16), torch.Generator().manual_seed(0))
    chars = "".join(batch.texts)
    sep = max(set(chars), key=chars.count)  # a separator that occurs: steps exist in most responses
    source = build_reward_source("process_reward_model", {"path": str(run_dir / "final"), "separator": sep})
    res = score_checked(source, [{"prompt": "hi"}] * len(batch.texts), batch.texts)
    mask = batch.response_mask
    dense = dense_rewards_for(True, batch.response_ids, mask, tok, res.token_rewards, mask)
    placed = 0
    for i, pairs in enumerate(res.token_rewards):
        n = int(mask[i].sum())
        expect = torch.zeros(mask.shape[1])
        for end, r in pairs:  # the first token whose decoded prefix reaches the step's end
            t = next(t for t in range(n) if len(tok.decode(batch.response_ids[i, :t + 1], skip_special_tokens=True)) >= end)
            expect[t] += r
            placed += 1
        assert torch.allclose(dense[i], expect, atol=1e-6)
    assert placed > 0
    with pytest.warns(UserWarning, match="ignored"):
        assert dense_rewards_for(False, batch.response_ids, mask, tok, res.token_rewards, mask) is None


def test_ppo_update_uses_the_dense_rewards_in_gae(prm_run, monkeypatch):
    """PPO's GAE rewards == -beta KL + c * score on the last token + dense, computed by hand."""
    import copy

    from rlmt.data import PromptFormat, encode_prompt
    from rlmt.rollout import SamplingParams, generate
    from rlmt.train import ppo as ppo_mod
    from rlmt.train.experience import Experience, UpdateContext
    from rlmt.train.methods import METHODS, update_step

    lm = load_model("tiny-random")
    G = 2
    prompts = [encode_prompt(lm.tokenizer, PromptFormat(), p) for p in ("a", "b")]
    batch = generate(lm.model, lm.tokenizer, prompts, SamplingParams(G, 1.0, max_new_tokens=5), torch.Generator().manual_seed(3))
    rewards = T([0.2, float("nan"), 0.7, 0.1])
    mask = batch.response_mask & torch.isfinite(rewards)[:, None]
    dense = torch.where(mask, torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)), torch.zeros(mask.shape))
    ref = batch.logprobs + 0.2 * torch.where(batch.response_mask, torch.ones(mask.shape), torch.zeros(mask.shape))
    cfg = load_config(None, ["algorithm=ppo", "model.name=tiny-random", f"rollout.num_samples={G}", "pg.beta=0.1",
                             "rm.dense_outcome_coef=0.5", "optim.batch_size=4"])
    seen = {}
    real_gae = ppo_mod.gae
    monkeypatch.setattr(ppo_mod, "gae", lambda r, *a: (seen.setdefault("r", r.clone()), real_gae(r, *a))[1])
    policy = copy.deepcopy(lm.model)
    head = ppo_mod.make_value_head(policy, cfg)
    trainable = torch.nn.ModuleList([policy, head])
    opt = torch.optim.SGD(trainable.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    update_step(UpdateContext(policy, head, trainable, opt, sched, cfg, {}, None, METHODS["ppo"]),
                Experience(batch, rewards, mask, ref, G, 1.0, dense))
    want = torch.zeros(mask.shape)
    for b in range(mask.shape[0]):
        ts = mask[b].nonzero().flatten().tolist()
        for t in ts:
            want[b, t] = -0.1 * float(batch.logprobs[b, t] - ref[b, t]) + float(dense[b, t])
        if ts:
            want[b, ts[-1]] += 0.5 * float(rewards[b])
    assert torch.allclose(seen["r"], want, atol=1e-6)


def test_reinforce_with_dense_rewards_uses_returns_to_go_minus_the_baseline(monkeypatch):
    from rlmt.train.estimators import reinforce_advantages
    from rlmt.train.experience import Experience, UpdateContext

    cfg = load_config(None, ["algorithm=reinforce", "model.name=tiny-random", "rollout.num_samples=2",
                             "pg.advantage=group", "pg.beta=0", "rm.dense_outcome_coef=1.0"])
    mask = T([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]).bool()
    dense = T([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.25, 0.0]])
    rewards = T([1.0, 0.0, 1.0, 1.0])

    class Batch:
        logprobs = torch.zeros(4, 3)

    exp = Experience(Batch(), rewards, mask, None, 2, 1.0, dense)
    seen = {"adv": reinforce_advantages(UpdateContext(None, None, None, None, None, cfg, {}), exp).values}
    # totals G_0: 2.0, 1.0 (group 1, mean 1.5); 1.0, 1.25 (group 2, mean 1.125): b = the group mean
    # row 0: G = [2.0, 1.5, 1.5] - 1.5; row 1: [1.0, 0.0] - 1.5; row 2: [1.0] - 1.125; row 3: [1.25, 1.25, 1.0] - 1.125
    want = T([[0.5, 0.0, 0.0], [-0.5, -1.5, 0.0], [-0.125, 0.0, 0.0], [0.125, 0.125, -0.125]])
    assert torch.allclose(seen["adv"], want, atol=1e-6)


def test_ppo_with_the_process_rm_as_reward_source_runs(prm_run, tmp_path):
    _, run_dir = prm_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "ppo"
    cfg = load_config(None, ["algorithm=ppo", "model.name=tiny-random", f"data.train={prompts}", "data.chat=false",
                             "rollout.num_samples=2", "rollout.batch_prompts=2", "rollout.max_new_tokens=8",
                             "reward.source=process_reward_model", "rm.dense_outcome_coef=0.5",
                             f"reward.args={{path: {run_dir / 'final'}, separator: ' '}}", "optim.max_steps=2",
                             "optim.batch_size=4", f"run.output_dir={out}", "run.progress=false"])
    train(cfg)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows)


def test_process_update_is_accumulation_invariant():
    """batch 6 x accumulation 1 == batch 2 x accumulation 3 (rows with different step counts)."""
    import copy

    from rlmt.models import ProcessHead
    from rlmt.data import StepExample, collate_steps
    from rlmt.train.process_reward_model import process_update

    lm = load_model("tiny-random")
    rng = random.Random(5)
    examples = []
    for i in range(6):
        n = 1 + i % 3
        completion = [rng.randrange(256) for _ in range(3 * n)]
        examples.append(StepExample([rng.randrange(256) for _ in range(2 + i % 2)], completion,
                                    [3 * k + 2 for k in range(n)], [float(rng.random() < 0.5) for _ in range(n)]))
    deltas = []
    for bs in (6, 2):
        model = copy.deepcopy(lm.model)
        head = ProcessHead(model.config.hidden_size)
        torch.nn.init.normal_(head.linear.weight, std=0.1, generator=torch.Generator().manual_seed(0))
        trainable = torch.nn.ModuleList([model, head])
        before = [p.detach().clone() for p in trainable.parameters()]
        opt = torch.optim.SGD(trainable.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        mbs = [collate_steps(examples[j:j + bs], lm.tokenizer.pad_token_id) for j in range(0, 6, bs)]
        metrics = process_update(model, head, trainable, mbs, opt, sched, 0.0, "cpu")
        assert metrics["steps"] == 12.0
        deltas.append(([p.detach() - b for p, b in zip(trainable.parameters(), before)], metrics["loss"]))
    (d1, l1), (d2, l2) = deltas
    assert l1 == pytest.approx(l2, abs=1e-6)
    for a, b in zip(d1, d2):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
