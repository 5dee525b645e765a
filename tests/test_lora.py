"""LoRA: base weights untouched, adapters saved separately, final/ loadable, reference = adapters off;
checkpoints are peft adapter directories that load in peft and resume exactly."""

import json
import shutil

import torch
from transformers import AutoModelForCausalLM

from rlmt.config import load_config
from rlmt.models import load_model
from rlmt.records import read_metrics
from rlmt.train.runner import train


def test_lora_sft_and_grpo(tmp_path):
    sft_rows = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(8)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    base = load_model("tiny-random").model.state_dict()
    common = ["model.name=tiny-random", "model.lora.r=4", "run.progress=false", "optim.lr=1e-2"]
    run = train(load_config(None, common + ["algorithm=sft", f"data.train={tmp_path / 'sft.jsonl'}",
                                            "optim.max_steps=3", "run.save_every=1",
                                            f"run.output_dir={tmp_path / 'sft'}"]))
    adapter = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-random"  # the name given, not a cache path
    assert (run / "final" / "adapter" / "tokenizer_config.json").exists()  # the adapter carries the tokenizer
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    changed = [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted projections moved (merged)
    _checkpoint_is_the_adapter(run, merged)
    _resume_equals_straight(run, common, tmp_path)

    prompts = [{"prompt": f"Write {c}"} for c in "abcd"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    run = train(load_config(None, common + [
        "algorithm=grpo", f"data.train={tmp_path / 'p.jsonl'}", "optim.max_steps=2", "pg.beta=0.1",
        "rollout.num_samples=4", "rollout.batch_prompts=2", "rollout.max_new_tokens=5", "reward.source=regex",
        "reward.args={pattern: '[a-m]'}", f"run.output_dir={tmp_path / 'grpo'}"]))
    rows = read_metrics(run)
    assert rows[0]["kl"] == 0.0 or abs(rows[0]["kl"]) < 1e-6  # LoRA B starts at 0: policy == reference
    assert len(rows) == 2


def _checkpoint_is_the_adapter(run, merged) -> None:
    """checkpoints/step-3 is a peft adapter directory holding the adapters only (and the tokenizer); peft loads it
    over the base model into the policy final/ holds merged."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ckpt = run / "checkpoints" / "step-3"
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "model.pt").exists()
    adapters = load_file(ckpt / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)  # the adapters only
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    assert AutoTokenizer.from_pretrained(ckpt)("Say 3").input_ids == load_model("tiny-random").tokenizer("Say 3").input_ids
    peft = PeftModel.from_pretrained(load_model("tiny-random").model, ckpt).eval()
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        a, b = peft(ids).logits, merged.eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def _resume_equals_straight(run, common, tmp_path) -> None:
    """Resuming the LoRA run from step-2 (as if killed after it) ends with the same adapters as the straight run."""
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-3")
    train(load_config(None, common + ["algorithm=sft", f"data.train={tmp_path / 'sft.jsonl'}", "optim.max_steps=3",
                                      f"run.output_dir={out}", "run.resume=true"]))
    a = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(d)] for d in (run, out)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 3
