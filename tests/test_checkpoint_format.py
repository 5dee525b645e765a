"""Checkpoints are Hugging Face model directories: ``from_pretrained(checkpoints/step-N)`` is the policy after
step N (the same logits as a run that stopped there), with its tokenizer; tied weights are stored once; the
weights are not stored a second time beside them; ``rlmt eval`` takes a step directory as ``model.name``; a
checkpoint whose weights do not fit the model is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmt.checkpoint import MANIFEST, read_model, save_checkpoint
from rlmt.cli import main
from rlmt.models import tiny_random_model, tiny_tokenizer

IDS = torch.tensor([[257, 50, 64, 88, 220, 18, 258, 257, 64]])  # token ids of the tiny tokenizer's vocabulary


def _args(data: Path, out: Path, steps: int) -> list[str]:
    return ["train", "algorithm=sft", "model.name=tiny-random", f"data.train={data}", "optim.batch_size=2",
            "optim.lr=1e-2", "run.save_every=1", "run.progress=false", f"optim.max_steps={steps}",
            f"run.output_dir={out}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two SFT runs on the same data: two steps (checkpoints step-1, step-2) and one step."""
    root = tmp_path_factory.mktemp("ckpt")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i} {i * 7}"}) + "\n" for i in range(8)))
    assert main(_args(data, root / "two", 2)) == 0
    assert main(_args(data, root / "one", 1)) == 0
    return root / "two", root / "one", data


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_a_step_directory_loads_in_transformers_as_the_policy_at_that_step(runs):
    two, one, _ = runs
    step1, step2 = two / "checkpoints" / "step-1", two / "checkpoints" / "step-2"
    assert torch.equal(_logits(step1), _logits(one / "final"))  # the policy of a run that stopped after step 1
    assert torch.equal(_logits(step2), _logits(two / "final"))
    assert not torch.allclose(_logits(step1), _logits(step2))  # the two steps differ: the check can fail
    tok = AutoTokenizer.from_pretrained(step2)
    assert tok.apply_chat_template([{"role": "user", "content": "Say 3"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nSay 3<|im_end|>\n<|im_start|>assistant\n"
    assert tok("Say 3").input_ids == tiny_tokenizer()("Say 3").input_ids and len(tok("Say 3").input_ids) == 5


def test_tied_weights_stored_once_and_the_weights_not_twice(runs):
    step = runs[0] / "checkpoints" / "step-2"
    model = AutoModelForCausalLM.from_pretrained(step)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied after loading
    with safe_open(step / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert names == set(model.state_dict()) - {"lm_head.weight"}
    unique = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters(): a tied one once
    embed = model.model.embed_tokens.weight
    size = (step / "model.safetensors").stat().st_size
    assert unique < size < unique + embed.numel() * embed.element_size() // 4  # the data once, plus a small header
    assert {p.name for p in step.glob("*.pt")} == {"optimizer.pt", "scheduler.pt", "rng.pt"}  # no model.pt beside
    listed = json.loads((step / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(listed)


def test_rlmt_eval_takes_a_step_directory(runs, tmp_path, capsys):
    two, _, data = runs
    out = tmp_path / "eval.json"
    assert main(["eval", f"model.name={two / 'checkpoints' / 'step-2'}", f"data.eval={data}", "eval.max_prompts=2",
                 "eval.max_new_tokens=3", "reward.source=regex", "reward.args={pattern: '[0-9]'}",
                 "run.progress=false", f"eval.output={out}"]) == 0
    assert "pass@1" in capsys.readouterr().out


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    model, tok = tiny_random_model()
    path = save_checkpoint(tmp_path, 1, model, None, None, {}, tokenizer=tok)
    fresh, _ = tiny_random_model(seed=1)
    read_model(fresh, path)  # the tied projection comes with the embedding
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    state = load_file(path / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"does not match the model \(missing \['model.norm.weight'\]"):
        read_model(fresh, path)
