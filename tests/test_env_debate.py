"""The debate environment (self-play): pairing, the opponent's argument in the next turn, verdicts judged in
both orders, symmetric rewards (a judge that always says "A" gives 0.5 to both), and a debate run end to end."""

import json
import re

import pytest
import torch

from chat_servers import start_scripted, stop_process
from rlmt.chat import ChatReply, ChatStats
from rlmt.config import ConfigError, load_config
from rlmt.data import PromptFormat
from rlmt.envs import Renderer, run_episodes
from rlmt.envs.debate import Debate
from rlmt.models import load_model
from rlmt.records import read_metrics
from rlmt.rollout import SamplingParams, sample_keys
from rlmt.train.runner import train


class Always:
    """A judge backend with a pure position bias: always the first response shown."""

    name = "always-a"

    def __init__(self, verdict="Verdict: A"):
        self.verdict, self.stats, self.requests = verdict, ChatStats(), []

    def complete(self, requests):
        self.requests += list(requests)
        return [ChatReply(self.verdict) for _ in requests]


class Prefers:
    """A consistent judge: the response that defends `answer` wins in either order."""

    name = "prefers"

    def __init__(self, answer):
        self.answer, self.stats = answer, ChatStats()

    def complete(self, requests):
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            a = re.search(r"<<<RESPONSE A \w+>>>\n(.*?)\n<<<END RESPONSE A", user, re.S).group(1)
            out.append(ChatReply("Verdict: A" if a.startswith(f"Defends: {self.answer}\n") else "Verdict: B"))
        return out


ROWS = [{"prompt": "Is 7 prime?", "answers": ["yes", "no"], "answer": "yes"},
        {"prompt": "Is 9 prime?", "answers": ["no", "yes"], "answer": "no"}]


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def _debate(lm, judge, G=2, rounds=2):
    return run_episodes(lm.model, lm.tokenizer, Renderer(lm.tokenizer, PromptFormat()),
                        lambda: Debate(judge=judge, rounds=rounds), ROWS, [1, 2], SamplingParams(G, 1.0, 1.0, 6),
                        sample_keys(0, 0, range(2), G), 4, 400, 2)


def test_a_position_biased_judge_gives_both_sides_half(lm):
    judge = Always()
    eb = _debate(lm, judge, G=4)
    assert eb.returns.tolist() == [0.5] * 8 and eb.metrics()["env/correct_side_wins"] == 0.5
    assert len(judge.requests) == 2 * 4  # 4 matches, each judged in both orders, in one call
    assert all(ep.done and len(ep.turn_ends) == 2 for ep in eb.episodes)


def test_a_consistent_judge_rewards_the_winner_and_the_loser_symmetrically(lm):
    eb = _debate(lm, Prefers("yes"))
    # row 0: side 0 defends yes (wins); row 1: side 1 defends yes (wins)
    assert eb.returns.tolist() == [1.0, 0.0, 0.0, 1.0]
    final, dense = eb.dense()
    assert final.tolist() == [1.0, 0.0, 0.0, 1.0] and dense.abs().sum() == 0  # given on the last turn
    # "yes" is the truth of row 0 and a falsehood of row 1: the judge's preference rewards the truth half the time
    assert eb.metrics()["env/correct_side_wins"] == 0.5


def test_each_side_hears_the_opponents_last_argument(lm):
    eb = _debate(lm, Always(), rounds=3)
    for j in range(0, 4, 2):
        a, b = eb.episodes[j], eb.episodes[j + 1]
        said = {0: [m["content"] for m in a.transcript if m["role"] == "assistant"],
                1: [m["content"] for m in b.transcript if m["role"] == "assistant"]}
        heard_a = [m["content"] for m in a.transcript[2:] if m["role"] == "user"]
        heard_b = [m["content"] for m in b.transcript[2:] if m["role"] == "user"]
        assert heard_a == [f"Your opponent argued:\n{t}\n\nAnswer them." for t in said[1][:2]]
        assert heard_b == [f"Your opponent argued:\n{t}\n\nAnswer them." for t in said[0][:2]]
        assert "You defend: " + ROWS[j // 2]["answers"][0] in a.transcript[1]["content"]
        assert "You defend: " + ROWS[j // 2]["answers"][1] in b.transcript[1]["content"]


def test_no_usable_verdict_leaves_both_sides_unscored(lm):
    eb = _debate(lm, Always("I cannot decide"))
    assert torch.isnan(eb.returns).all()


def test_debate_needs_pairs_and_a_judge(tmp_path):
    data = tmp_path / "debate.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = ["algorithm=grpo", "model.name=tiny-random", f"data.train={data}", "env.source=debate",
            f"run.output_dir={tmp_path / 'run'}", "run.progress=false"]
    with pytest.raises(ConfigError, match="rollout.num_samples: environment 'debate' needs a multiple of 2"):
        train(load_config(None, base + ["rollout.num_samples=3", "env.args={judge: {backend: local}}"]))
    with pytest.raises(ConfigError, match="env.max_turns: environment 'debate' needs 3 turns, got 2"):
        train(load_config(None, base + ["rollout.num_samples=2", "env.max_turns=2",
                                        "env.args={rounds: 3, judge: {backend: local}}"]))
    with pytest.raises(ConfigError, match="needs a judge"):
        train(load_config(None, base + ["rollout.num_samples=2"]))
    with pytest.raises(ConfigError, match=r"judge: \['max_tokens'\] not taken by the local chat backend"):
        train(load_config(None, base + ["rollout.num_samples=2", "env.args={judge: {backend: local, max_tokens: 8}}"]))


def test_self_play_trains_on_both_sides(tmp_path):
    """GRPO on debates judged over HTTP by a position-biased judge: both sides' turns are trained on, 0.5 each."""
    data = tmp_path / "debate.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    proc, url = start_scripted("always-a")
    try:
        cfg = load_config(None, ["algorithm=grpo", "model.name=tiny-random", f"data.train={data}", "env.source=debate",
                                 f"env.args={{rounds: 2, judge: {{backend: http, base_url: '{url}', model: j}}}}",
                                 "rollout.num_samples=2", "rollout.batch_prompts=2", "rollout.max_new_tokens=6",
                                 "optim.max_steps=1", "optim.batch_size=4", f"run.output_dir={tmp_path / 'run'}",
                                 "run.progress=false"])
        rows = read_metrics(train(cfg))
    finally:
        stop_process(proc)
    last = rows[-1]
    assert last["env/turns_mean"] == 2 and last["env/return_mean"] == 0.5 and last["reward/unscored"] == 0
    assert last["tokens"] == last["rollout/tokens"]  # every sampled token of both sides is trained on
