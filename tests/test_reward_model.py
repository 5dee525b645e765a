"""Outcome reward model: Bradley-Terry against hand-computed values, the step's invariants (accumulation,
padding), a tiny-model run that learns a separable preference, exact resume, and the trained model as a
reward source (scores equal a direct forward of the saved trunk + head; z-scores; GRPO runs on it)."""

import copy
import json
import math
import shutil

import pytest
import torch

from rlmt.config import load_config
from rlmt.models import load_model
from rlmt.objectives.preference import bradley_terry_loss
from rlmt.records import read_metrics
from rlmt.rewards import build_reward_source, score_checked
from rlmt.data import PreferencePair
from rlmt.models.reward_model import HEAD_FILE, META_FILE, RewardModel
from rlmt.models import RewardHead
from rlmt.train.reward_model import rm_update
from rlmt.train.runner import train

T = torch.tensor


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The runs here use runtime.threads=1 (robust timings on a busy 2-core box); later test files get theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------- the math


def test_bradley_terry_hand_computed():
    # r_w = [1, 0], r_l = [0, 2] -> d = [1, -2]
    #   loss = (-log sigmoid(1) - log sigmoid(-2)) / 2 = (0.313262 + 2.126928) / 2 = 1.220095
    #   accuracy 1/2, margin (1 - 2) / 2 = -0.5
    loss, m = bradley_terry_loss(T([1.0, 0.0]), T([0.0, 2.0]))
    assert float(loss) == pytest.approx(1.220095, abs=1e-5)
    assert m["loss"] == pytest.approx(1.220095, abs=1e-5)
    assert m["rewards/accuracy"] == 0.5 and m["rewards/margin"] == pytest.approx(-0.5)
    assert m["rewards/chosen"] == pytest.approx(0.5) and m["rewards/rejected"] == pytest.approx(1.0)
    # normalizer: the sum over pairs divided by the step's pair count (4)
    loss4, _ = bradley_terry_loss(T([1.0, 0.0]), T([0.0, 2.0]), normalizer=4)
    assert float(loss4) == pytest.approx(1.220095 / 2, abs=1e-5)
    # a tie: loss log 2, and it counts as wrong
    loss, m = bradley_terry_loss(T([0.3]), T([0.3]))
    assert float(loss) == pytest.approx(math.log(2)) and m["rewards/accuracy"] == 0.0


def test_bradley_terry_gradient():
    # dL/dr_w,i = -sigmoid(-d_i) / B, dL/dr_l,i = +sigmoid(-d_i) / B
    #   d = [1, -2]: -sigmoid(-1) / 2 = -0.134471, -sigmoid(2) / 2 = -0.440399
    rw, rl = T([1.0, 0.0], requires_grad=True), T([0.0, 2.0], requires_grad=True)
    bradley_terry_loss(rw, rl)[0].backward()
    assert rw.grad.tolist() == pytest.approx([-_sigmoid(-1) / 2, -_sigmoid(2) / 2], abs=1e-6)
    assert rw.grad.tolist() == pytest.approx([-0.134471, -0.440399], abs=1e-6)
    assert torch.allclose(rl.grad, -rw.grad)
    # shift invariance: only the difference matters
    shifted = bradley_terry_loss(T([1.0, 0.0]) + 5, T([0.0, 2.0]) + 5)[0]
    assert float(shifted) == pytest.approx(1.220095, abs=1e-5)


# ------------------------------------------------------------------------------------- the step, tiny model


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(0)
    lm = load_model("tiny-random")
    return RewardModel(lm.model, RewardHead(lm.model.config.hidden_size), lm.tokenizer)


def _pairs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda k: torch.randint(0, 250, (k,), generator=g).tolist()  # noqa: E731
    return [PreferencePair(r(3 + i % 3), r(2 + i % 4), r(4 - i % 3)) for i in range(n)]


def _update(rm, pairs, batch_size):
    """One RM step with SGD (lr 1): the update is exactly -gradient."""
    rm = copy.deepcopy(rm)
    opt = torch.optim.SGD(rm.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mbs = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    return rm, rm_update(rm, mbs, opt, sched, 0.0, 256, "cpu")


def test_accumulation_4x1_equals_1x4(rm):
    pairs = _pairs()
    m4, a = _update(rm, pairs, batch_size=4)
    m1, b = _update(rm, pairs, batch_size=1)
    for k in ("loss", "rewards/accuracy", "rewards/margin", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for (n, p4), p1 in zip(m4.named_parameters(), m1.parameters()):
        assert torch.allclose(p4, p1, atol=1e-6, rtol=1e-4), n
    moved = sum(float((p - p0).detach().abs().sum()) for p, p0 in zip(m4.head.parameters(), rm.head.parameters()))
    assert moved > 1e-4  # the head (and so the comparison) is not trivially still


def test_score_reads_the_last_token_whatever_the_padding(rm):
    pairs = _pairs(6)
    prompts, completions = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs]
    batched = rm.score(prompts, completions, batch_size=6)  # right-padded to the longest row
    alone = torch.cat([rm.score([p], [c]) for p, c in zip(prompts, completions)])
    assert batched.shape == (6,) and torch.allclose(batched, alone, atol=1e-5)
    # the score is the head on the decoder's hidden state at the last token, not at a pad
    ids = torch.tensor([prompts[0] + completions[0]])
    with torch.no_grad():
        direct = rm.head(rm.trunk.get_decoder()(input_ids=ids).last_hidden_state[0, -1])
    assert float(alone[0]) == pytest.approx(float(direct), abs=1e-5)


# --------------------------------------------------------------------------------------------- end to end


def _write(path, idx):
    # separable: the chosen completion is the number, the rejected one a refusal
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": "no"} for i in idx]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(d, *extra):
    return load_config(None, ["algorithm=reward_model", "model.name=tiny-random", "runtime.threads=1",
                              f"run.output_dir={d / 'run'}", f"data.train={_write(d / 'train.jsonl', range(16))}",
                              f"data.eval={_write(d / 'eval.jsonl', range(50, 58))}", "optim.batch_size=4",
                              "optim.lr=1e-3", "optim.max_steps=6", "run.seed=0", "run.save_every=1",
                              "run.keep_checkpoints=10", "run.progress=false", "run.eval_before_after=true", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    return train(_cfg(d)), d


def test_training_learns_a_separable_preference(trained):
    run, _ = trained
    before = json.loads((run / "eval-before.json").read_text())
    after = json.loads((run / "eval-after.json").read_text())
    assert before["pairs"] == after["pairs"] == 8
    # seed 0: the random head starts on the wrong side of every held-out pair; 6 steps fix all of them
    assert before["pairwise_accuracy"] <= 0.25
    assert after["pairwise_accuracy"] == 1.0 and after["margin"] > 1.0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    losses = [r["loss"] for r in rows]
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)  # near-chance at the start
    assert all(a > b for a, b in zip(losses[:4], losses[1:5])), losses  # falls step after step
    assert all(k in rows[0] for k in ("rewards/accuracy", "rewards/margin", "grad_norm", "lr"))
    meta = json.loads((run / "final" / META_FILE).read_text())
    assert meta["hidden_size"] == 64 and meta["score_std"] > 0 and (run / "final" / HEAD_FILE).exists()
    assert (run / "checkpoints" / "step-3" / "reward_head.pt").exists()


def test_resume_from_a_mid_run_checkpoint_is_exact(trained, tmp_path):
    run, d = trained
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    shutil.rmtree(copy_dir / "final")
    for k in (4, 5, 6):
        shutil.rmtree(copy_dir / "checkpoints" / f"step-{k}")
    resumed = train(_cfg(d, f"run.output_dir={copy_dir}", "run.resume=true"))
    from safetensors.torch import load_file

    a, b = load_file(run / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (torch.load(r / "final" / HEAD_FILE) for r in (run, resumed))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop(read_metrics(resumed)) == drop(read_metrics(run))


def test_source_scores_equal_a_direct_forward_and_are_z_scores(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained[0] / "final"
    rows = [{"prompt": "What is 3 + 1?"}, {"prompt": "What is 70 + 1?"},
            {"prompt": [{"role": "user", "content": "Hi"}]}]
    responses = ["4", "no", "a longer answer of several tokens"]
    source = build_reward_source("reward_model", {"path": str(final), "batch_size": 2})
    result = score_checked(source, rows, responses)
    raw = [d["raw_score"] for d in result.details]
    # direct: the saved trunk and head, one unpadded sequence at a time
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    head = torch.load(final / HEAD_FILE)["linear.weight"][0]  # (H,)
    for row, text, r in zip(rows, responses, raw):
        msgs = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert r == pytest.approx(float(h @ head), abs=1e-4)
    meta = json.loads((final / META_FILE).read_text())
    z = [(r - meta["score_mean"]) / meta["score_std"] for r in raw]
    assert result.scores == pytest.approx(z, abs=1e-6)
    assert raw[0] > raw[1]  # it learned the preference: a number beats a refusal
    # an SFT row with ``messages`` is scored on its turns before the last, like the same prompt row
    sft_row = {"messages": rows[2]["prompt"] + [{"role": "assistant", "content": "ignored"}]}
    assert source.score([sft_row], responses[2:]).details[0]["raw_score"] == pytest.approx(raw[2], abs=1e-6)
    plain = build_reward_source("reward_model", {"path": str(final), "normalize": False})
    assert plain.score(rows, responses).scores == pytest.approx(raw, abs=1e-5)


def test_bad_path_is_a_config_error(tmp_path):
    from rlmt.config import ConfigError

    with pytest.raises(ConfigError, match="reward_model.json"):
        build_reward_source("reward_model", {"path": str(tmp_path)})


def test_grpo_runs_on_the_reward_model(trained, tmp_path):
    from rlmt.tasks import write_addition_split

    train_file, _ = write_addition_split(tmp_path, 8, 2)
    cfg = load_config(None, ["algorithm=grpo", "model.name=tiny-random", "runtime.threads=1",
                             f"run.output_dir={tmp_path / 'grpo'}", f"data.train={train_file}",
                             "reward.source=reward_model", f"reward.args={{path: {trained[0] / 'final'}}}",
                             "rollout.num_samples=2", "rollout.batch_prompts=2", "rollout.max_new_tokens=4",
                             "optim.max_steps=2", "optim.lr=1e-3", "run.progress=false"])
    rows = read_metrics(train(cfg))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward/mean"]) and r["reward/unscored"] == 0 for r in rows)
    assert any(r["reward/std"] > 0 for r in rows)  # z-scores of different responses differ
