"""Typed run configuration: YAML + ``key=value`` overrides, validated once at the edge.

Every field carries a one-line doc (``rlmt train --help-config`` prints them). Unknown keys are errors that
name the key and the closest valid one. After :func:`load_config` the config is frozen and passed as a value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key (and file) at fault."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def section(cls: type, text: str) -> Any:
    return field(default_factory=cls, metadata={"doc": text})


@dataclass(frozen=True)
class LoraConfig:
    r: int = doc(0, "LoRA rank; 0 disables LoRA and trains all weights")
    alpha: float = doc(16.0, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = doc(0.0, "dropout on the LoRA input")
    target_modules: list = doc(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")


@dataclass(frozen=True)
class ModelConfig:
    name: str = doc("smollm2-135m-instruct", "model: 'smollm2-135m-instruct', 'tiny-random[:L:H]', or a transformers directory")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "weight dtype (float32 on CPU)")
    device: str = doc("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    autocast: Literal["none", "bfloat16", "auto"] = doc(
        "none", "mixed precision: forward passes (rollout, reference, training) in bfloat16 under torch.autocast, "
                "weights/gradients/optimizer in float32, log-probs from a float32 output projection; 'auto' = "
                "bfloat16 where the device has bf16 matrix units (CUDA with bf16, CPU with AMX), else none")
    lora: LoraConfig = section(LoraConfig, "optional LoRA adapters (peft)")


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = doc(0, "torch intra-op threads, set when the run starts; 0 keeps torch's default")
    huge_pages: bool = doc(
        True, "CPU: torch advises tensors of 2 MiB or more for transparent huge pages (THP_MEM_ALLOC_ENABLE=1). "
              "torch reads this once, at its first allocation: the rlmt command line sets it before torch starts; "
              "a library caller sets THP_MEM_ALLOC_ENABLE=1 in the environment itself (the run reports which is in "
              "effect). Linux only")
    mmap_threshold: int = doc(
        -1, "CPU: glibc's mmap threshold in bytes, fixed when the run starts (blocks this large are unmapped as "
            "soon as they are freed); -1: 4 MiB when huge pages are in effect, else glibc's adaptive threshold; "
            "0: glibc's adaptive threshold")
    heap_trim: bool = doc(True, "CPU: hand glibc's free heap back to the OS between the phases of an online step "
                                "(rollout, reference pass, update): lower peak memory, a few ms each")
    layer_trim: Literal["auto", "on", "off"] = doc(
        "auto", "CPU: also trim after every decoder layer of a training forward; auto: only when huge pages or "
                "a fixed mmap threshold are not both in effect")


@dataclass(frozen=True)
class DataConfig:
    train: str = doc("", "training data: JSONL path (or any file the `datasets` library reads)")
    eval: str = doc("", "held-out data for `rlmt eval` and before/after numbers")
    demonstrations: str = doc("", "SFT rows (prompt, completion, optional reward) for return-weighted optimization")
    chat: bool = doc(True, "format prompts with the tokenizer's chat template")
    system_prompt: Optional[str] = doc(None, "system message for chat prompts (None: the template's default)")
    max_prompt_tokens: int = doc(256, "longest allowed prompt, in tokens")
    max_completion_tokens: int = doc(256, "SFT completions are truncated to this many tokens (counted)")
    on_invalid: Literal["error", "skip"] = doc("error", "bad rows: 'error' stops with file/line/field, 'skip' filters and counts")
    limit: int = doc(0, "use only the first N rows (0: all)")
    shuffle: bool = doc(True, "shuffle training rows each epoch (seeded)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = doc(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay")
    betas: list = doc([0.9, 0.999], "AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    schedule: Literal["constant", "linear", "cosine"] = doc("constant", "LR decay after warmup")
    warmup_steps: int = doc(0, "linear warmup from 0 over this many optimizer steps")
    max_grad_norm: float = doc(1.0, "clip the global gradient norm to this (0: no clipping)")
    step_in_backward: bool = doc(
        False, "apply each parameter's AdamW update in backward as soon as its gradient is complete and free it: "
               "no model-size gradient buffer (saves one model size of memory); needs max_grad_norm 0 and one "
               "backward per optimizer step; a non-finite gradient skips that parameter only")
    batch_size: int = doc(8, "examples per micro-batch")
    grad_accum: int = doc(1, "micro-batches per optimizer step (examples/step = batch_size * grad_accum)")
    max_steps: int = doc(0, "optimizer steps to run (0: derive from epochs)")
    epochs: float = doc(1.0, "passes over the training data when max_steps is 0")


@dataclass(frozen=True)
class SFTConfig:
    packing: bool = doc(False, "pack several short examples into one row (block-diagonal attention, no cross-talk)")
    pack_length: int = doc(512, "token length of a packed row")


@dataclass(frozen=True)
class RolloutConfig:
    num_samples: int = doc(8, "G: responses sampled per prompt")
    temperature: float = doc(1.0, "sampling temperature (0: greedy)")
    top_p: float = doc(1.0, "nucleus sampling mass")
    max_new_tokens: int = doc(64, "longest response, in tokens")
    stop: list = doc([], "stop strings: a response ends when one appears (kept in the text)")
    batch_prompts: int = doc(8, "prompts per rollout batch (batch = batch_prompts * num_samples sequences)")


@dataclass(frozen=True)
class RewardConfig:
    source: str = doc("math_answer", "reward source name (see rlmt.rewards.REGISTRY)")
    args: dict = doc({}, "keyword arguments of the reward source")
    invalid_as_none: bool = doc(False, "a non-finite score becomes None (excluded, counted) instead of an error")
    pass_threshold: float = doc(1.0, "a response passes (pass rate, pass@1) when its reward is >= this")


@dataclass(frozen=True)
class RejectionConfig:
    rounds: int = doc(1, "R: sample -> score -> keep -> SFT rounds")
    prompts_per_round: int = doc(64, "prompts sampled each round (0: all training prompts)")
    keep_top_k: int = doc(1, "keep the best k responses of each prompt (0: keep all that pass the threshold)")
    threshold: Optional[float] = doc(None, "keep only responses whose reward is >= this")
    dedupe: bool = doc(True, "drop identical kept responses of the same prompt")
    sft_epochs: float = doc(1.0, "SFT passes over each round's kept set")


@dataclass(frozen=True)
class PolicyGradientConfig:
    advantage: Literal["group", "group_no_std", "leave_one_out", "running_mean", "none"] = doc(
        "group", "group: (r - mean_G)/(std_G + eps); group_no_std: r - mean_G; leave_one_out: RLOO; "
                 "running_mean: r - moving average; none: r")
    baseline_momentum: float = doc(0.9, "momentum of the running-mean baseline")
    clip_eps: float = doc(0.2, "PPO/GRPO clip range: ratio in [1 - clip_eps, 1 + clip_eps_high]")
    clip_eps_high: Optional[float] = doc(None, "upper clip (None: clip_eps; larger = DAPO clip-higher)")
    beta: float = doc(0.04, "weight of KL(pi || pi_ref); 0 skips the reference model entirely")
    kl_estimator: Literal["k3", "k1"] = doc("k3", "per-token KL estimator in the loss")
    kl_in_reward: bool = doc(False, "fold beta * k1 KL into the reward instead of the loss")
    epochs: int = doc(1, "optimization epochs over each rollout batch (1: no second pass for pi_old)")
    minibatches: int = doc(1, "optimizer steps per epoch (the rollout batch is split into this many)")
    aggregation: Literal["token_mean", "seq_mean", "seq_sum", "constant"] = doc(
        "token_mean", "loss reduction (normalized over the whole minibatch, so accumulation-invariant)")
    curriculum: bool = doc(False, "draw prompts by running pass rate, favouring groups that still vary")
    curriculum_momentum: float = doc(0.7, "EMA momentum of each prompt's running pass rate")
    curriculum_floor: float = doc(0.02, "weight added to every prompt so solved/hopeless ones still return")
    nll_coef: float = doc(0.0, "lambda: return-weighted optimization adds lambda * NLL on data.demonstrations")
    nll_tau: Optional[float] = doc(None, "weight demonstrations by exp(R / tau) (normalized to mean 1); None: equal")


@dataclass(frozen=True)
class PPOConfig:
    gamma: float = doc(1.0, "discount over tokens in GAE")
    lam: float = doc(0.95, "GAE lambda")
    vf_coef: float = doc(0.1, "weight of the value loss")
    value_clip: Optional[float] = doc(0.2, "clip of the value update around the old values (None: off)")
    whiten_advantages: bool = doc(True, "normalize GAE advantages over the batch's response tokens")
    critic_lr: Optional[float] = doc(None, "learning rate of the value head (None: optim.lr)")


@dataclass(frozen=True)
class TRPOConfig:
    max_kl: float = doc(0.01, "delta: the trust region, mean KL(pi_old || pi) over response tokens")
    cg_iters: int = doc(10, "conjugate-gradient iterations for F^-1 g")
    cg_damping: float = doc(0.1, "damping added to the Fisher-vector product (F + damping * I)")
    backtrack_steps: int = doc(10, "line-search trials (fractions ratio^0 .. ratio^(n-1)) before the step is rejected")
    backtrack_ratio: float = doc(0.5, "step shrink factor per line-search iteration")


@dataclass(frozen=True)
class DPOConfig:
    loss: Literal["dpo", "ipo", "cdpo"] = doc(
        "dpo", "preference loss: 'dpo' (sigmoid), 'ipo' (squared), 'cdpo' (label-smoothed DPO)")
    beta: float = doc(0.1, "strength of the implicit KL to the reference (DPO's beta, IPO's tau)")
    label_smoothing: float = doc(0.0, "cdpo: probability eps that a preference label is flipped, in [0, 0.5)")


@dataclass(frozen=True)
class RewardModelConfig:
    step_separator: str = doc("\n", "process RM: split a response (or a row without `steps`) into steps at this string")
    step_aggregate: Literal["min", "product", "mean", "last"] = doc(
        "min", "process RM: how per-step scores combine into the outcome score")
    dense_outcome_coef: float = doc(
        1.0, "PPO/REINFORCE with dense (per-step) rewards: weight of the outcome score on the last token "
             "(0: dense step rewards only)")
    normalize: bool = doc(True, "after training, store the mean/std of train-set scores so the RM returns z-scores")


@dataclass(frozen=True)
class GrapeConfig:
    rubric: str = doc("", "rubric YAML: categories, system prompts and weighted items (see examples/grape/)")
    critic: dict = doc({}, "critic backend: {backend: local|http, model|base_url, ...} (see rlmt.chat)")
    critic_mode: Literal["json", "logprobs"] = doc(
        "json", "json: the critic writes reasoning + JSON score/confidence; logprobs (local only): score and "
                "confidence read from the critic's distribution over the score digits")
    gate_on_verifiable: bool = doc(True, "items with `gated_by` are skipped (missing) when their gate item scored 0")
    guard: bool = doc(True, "a response that addresses the grader (rlmt.chat.guard) fails its judged items")
    low_confidence: float = doc(0.5, "oversight: flag items whose mean confidence stays below this")
    min_score_std: float = doc(0.02, "oversight: flag items whose score std over the run is below this")
    revise: bool = doc(False, "critique-revise: the policy revises each group's lowest-scored response; the "
                              "revision joins training as a return-weighted demonstration")


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = doc(4, "K samples per prompt for pass@1")
    temperature: float = doc(1.0, "sampling temperature for eval (0: greedy)")
    max_new_tokens: int = doc(64, "longest response, in tokens")
    max_prompts: int = doc(0, "evaluate on the first N prompts (0: all)")
    output: str = doc("", "write per-sample results to this JSONL (default: RUN_DIR/eval-*.jsonl)")


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = doc("runs/run", "run directory (config, metrics.jsonl, checkpoints/, final/)")
    seed: int = doc(0, "seed for data order, sampling and initialisation")
    save_every: int = doc(0, "checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "keep this many most recent checkpoints")
    resume: str = doc("false", "'false', 'true' (latest checkpoint in output_dir) or a checkpoint path")
    log_every: int = doc(1, "print a metrics line every N steps")
    tensorboard: bool = doc(False, "also log metrics to TensorBoard (needs the tensorboard package)")
    progress: bool = doc(True, "show a progress bar with ETA")
    eval_before_after: bool = doc(False, "evaluate on data.eval before and after training")


@dataclass(frozen=True)
class Config:
    algorithm: Literal["sft", "rejection_sampling", "reinforce", "grpo", "ppo", "trpo", "dpo", "reward_model",
                       "process_reward_model", "grape", "pipeline"] = doc("sft", "training method")
    model: ModelConfig = section(ModelConfig, "the policy")
    data: DataConfig = section(DataConfig, "datasets and prompt formatting")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batching")
    sft: SFTConfig = section(SFTConfig, "supervised fine-tuning options")
    rollout: RolloutConfig = section(RolloutConfig, "sampling for online methods")
    reward: RewardConfig = section(RewardConfig, "the reward source")
    rejection: RejectionConfig = section(RejectionConfig, "rejection sampling")
    pg: PolicyGradientConfig = section(PolicyGradientConfig, "policy-gradient methods (REINFORCE, GRPO, PPO, TRPO)")
    ppo: PPOConfig = section(PPOConfig, "PPO: value head, GAE, value loss")
    trpo: TRPOConfig = section(TRPOConfig, "TRPO: trust region, conjugate gradient, line search")
    dpo: DPOConfig = section(DPOConfig, "DPO and its variants: offline preference pairs against a frozen reference")
    rm: RewardModelConfig = section(RewardModelConfig, "reward models: outcome (Bradley-Terry) and process (per step)")
    grape: GrapeConfig = section(GrapeConfig, "GRAPE: rubric rewards from confidence-weighted critiques")
    stages: list = doc([], "pipeline: ordered stages [{name, ...config keys}], each merged over this config; "
                           "'${NAME}' in a value is stage NAME's final/ directory")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    runtime: RuntimeConfig = section(RuntimeConfig, "process settings applied when a run starts: threads, allocator")
    run: RunConfig = section(RunConfig, "run directory, seeding, checkpoints, logging")


# ---------------------------------------------------------------------------------------------- parsing


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if _is_section(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    everywhere = _all_keys(Config)
    leaf = key.split(".")[-1]
    # the same leaf in another section (`run.lr` -> `optim.lr`) beats a fuzzy match in this one (`run.log_every`)
    close = ([k for k in everywhere if k.split(".")[-1] == leaf][:1]
             or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
             or difflib.get_close_matches(key, everywhere, n=1, cutoff=0.5))
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown config key {key!r}{hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}{key}: {value!r} is not one of {list(choices)}{hint}")
        return value
    bad = ConfigError(f"{where}{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise bad
        return str(value)
    if tp is list:
        if not isinstance(value, list):
            raise bad
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise bad


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), [prefix + n for n in names], where)
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, prefix + name + ".", where)
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Read YAML at ``path`` (optional), apply ``base`` defaults then ``overrides``, validate, freeze."""
    data: dict = {}
    where = ""
    if base:
        data = yaml.safe_load(yaml.safe_dump(base))
    if path is not None:
        where = f"{path}: "
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}top level must be a mapping of config keys")
        _deep_merge(data, loaded)
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    cfg = _build(Config, data, "", where)
    validate(cfg, where)
    return cfg


def _deep_merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def validate(cfg: Config, where: str = "") -> None:
    """Cross-field checks that types alone cannot express."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}{key}: {msg}")

    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.batch_size >= 1, "optim.batch_size", "must be >= 1")
    need(cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    need(cfg.optim.max_steps >= 0, "optim.max_steps", "must be >= 0")
    need(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    need(cfg.rollout.num_samples >= 1, "rollout.num_samples", "must be >= 1")
    need(cfg.rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(cfg.eval.num_samples >= 1, "eval.num_samples", "must be >= 1")
    need(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    need(cfg.rejection.keep_top_k >= 0, "rejection.keep_top_k", "must be >= 0")
    need(cfg.rejection.keep_top_k > 0 or cfg.rejection.threshold is not None, "rejection.keep_top_k",
         "0 (keep all) needs rejection.threshold")
    need(cfg.run.resume.lower() in ("true", "false") or Path(cfg.run.resume).exists(), "run.resume",
         f"'true', 'false' or an existing checkpoint path, got {cfg.run.resume!r}")
    need(cfg.model.lora.r >= 0, "model.lora.r", "must be >= 0")
    need(cfg.pg.epochs >= 1, "pg.epochs", "must be >= 1")
    need(cfg.pg.minibatches >= 1, "pg.minibatches", "must be >= 1")
    need(cfg.pg.beta >= 0, "pg.beta", "must be >= 0")
    revise = cfg.algorithm == "grape" and cfg.grape.revise
    need(cfg.pg.nll_coef == 0 or bool(cfg.data.demonstrations) or revise, "data.demonstrations",
         "pg.nll_coef > 0 needs a demonstrations file (or grape.revise)")
    need(not revise or cfg.pg.nll_coef > 0, "pg.nll_coef", "grape.revise needs pg.nll_coef > 0 (the weight of the "
         "revisions' NLL)")
    need(cfg.pg.nll_tau is None or cfg.pg.nll_tau > 0, "pg.nll_tau", "must be > 0")
    need(cfg.trpo.max_kl > 0, "trpo.max_kl", "must be > 0")
    need(0 < cfg.trpo.backtrack_ratio < 1, "trpo.backtrack_ratio", "must be in (0, 1)")
    need(cfg.trpo.cg_iters >= 1, "trpo.cg_iters", "must be >= 1")
    need(cfg.trpo.cg_damping >= 0, "trpo.cg_damping", "must be >= 0")
    need(cfg.trpo.backtrack_steps >= 0, "trpo.backtrack_steps", "must be >= 0")
    need(cfg.dpo.beta > 0, "dpo.beta", "must be > 0")
    need(0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    need(0 <= cfg.ppo.lam <= 1 and 0 <= cfg.ppo.gamma <= 1, "ppo.lam", "gamma and lam must be in [0, 1]")
    if cfg.algorithm == "grape":
        need(bool(cfg.grape.rubric), "grape.rubric", "algorithm grape needs a rubric file")
    need(cfg.algorithm == "pipeline" or not cfg.stages, "stages", "only algorithm pipeline runs stages")
    if cfg.algorithm == "pipeline":
        need(bool(cfg.stages), "stages", "algorithm pipeline needs at least one stage")
        need(cfg.run.resume.lower() in ("true", "false"), "run.resume",
             "a pipeline resumes each stage from its own checkpoints; use true/false, not a path")
    if cfg.optim.step_in_backward:
        _validate_step_in_backward(cfg, need)
    if cfg.algorithm in ("grpo", "reinforce", "trpo", "grape") and cfg.pg.advantage in ("group", "group_no_std", "leave_one_out"):
        need(cfg.rollout.num_samples >= 2, "rollout.num_samples", f"pg.advantage={cfg.pg.advantage} needs >= 2 samples per prompt")


def _validate_step_in_backward(cfg: Config, need: Callable[[bool, str, str], None]) -> None:
    """optim.step_in_backward updates each parameter inside one backward pass: no global clipping, no
    accumulation over several backward passes, no step of its own (TRPO)."""
    need(cfg.optim.max_grad_norm == 0, "optim.max_grad_norm",
         "must be 0 with optim.step_in_backward (the global gradient norm is known only after backward)")
    need(cfg.algorithm != "trpo", "optim.step_in_backward", "TRPO takes its own trust-region step")
    need(cfg.optim.grad_accum == 1, "optim.grad_accum", "must be 1 with optim.step_in_backward")
    if cfg.algorithm in ("grpo", "reinforce", "ppo", "grape"):
        per_step = math.ceil(cfg.rollout.batch_prompts * cfg.rollout.num_samples / cfg.pg.minibatches)
        need(cfg.optim.batch_size >= per_step, "optim.batch_size",
             f"must be >= {per_step} (the sequences of one optimizer step) with optim.step_in_backward, so one "
             "backward pass makes the step")
        need(cfg.pg.nll_coef == 0, "pg.nll_coef", "the demonstration NLL is a second backward pass per step; "
             "it cannot run with optim.step_in_backward")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field, for ``--help-config``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            rows.append((prefix + f.name, "", f.metadata.get("doc", "")))
            rows.extend(describe(tp, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((prefix + f.name, repr(default), f.metadata.get("doc", "")))
    return rows
