"""LoRA: base weights untouched, adapters saved separately, final/ loadable, reference = adapters off."""

import json

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
                                            "optim.max_steps=3", f"run.output_dir={tmp_path / 'sft'}"]))
    adapter = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-random"  # the name given, not a cache path
    assert (run / "final" / "adapter" / "tokenizer_config.json").exists()  # the adapter carries the tokenizer
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    changed = [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted projections moved (merged)
    ckpt = torch.load(run / "checkpoints" / "step-3" / "model.pt", weights_only=True)
    assert all("lora_" in k for k in ckpt["tensors"])  # checkpoints hold the adapters only

    prompts = [{"prompt": f"Write {c}"} for c in "abcd"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    run = train(load_config(None, common + [
        "algorithm=grpo", f"data.train={tmp_path / 'p.jsonl'}", "optim.max_steps=2", "pg.beta=0.1",
        "rollout.num_samples=4", "rollout.batch_prompts=2", "rollout.max_new_tokens=5", "reward.source=regex",
        "reward.args={pattern: '[a-m]'}", f"run.output_dir={tmp_path / 'grpo'}"]))
    rows = read_metrics(run)
    assert rows[0]["kl"] == 0.0 or abs(rows[0]["kl"]) < 1e-6  # LoRA B starts at 0: policy == reference
    assert len(rows) == 2
