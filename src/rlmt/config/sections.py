"""The config's sections: frozen dataclasses with a one-line doc on every field (``rlmt train --help-config``
prints them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional



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
    parallel: Literal["ddp", "fsdp"] = doc(
        "ddp", "on several processes: 'ddp' holds the whole model on every rank; 'fsdp' shards each decoder layer's "
               "weights, gradients and AdamW moments across the ranks (FSDP2), embeddings and heads replicated")
    fsdp_cpu_offload: bool = doc(False, "model.parallel=fsdp: keep the sharded weights, gradients and moments in CPU "
                                        "memory (GPU runs short of memory)")


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
    train: str = doc("", "training data: a .jsonl/.json/.csv/.parquet/.arrow file, a save_to_disk directory, or a "
                         "Hugging Face hub dataset id (org/name)")
    eval: str = doc("", "held-out data for `rlmt eval` and before/after numbers (read as data.train)")
    split: str = doc("train", "split of data.train when it is a hub dataset or a DatasetDict directory")
    eval_split: str = doc("test", "split of data.eval when it is a hub dataset or a DatasetDict directory")
    subset: Optional[str] = doc(None, "hub dataset: the subset (config name) to load, e.g. 'main' for openai/gsm8k")
    columns: dict = doc({}, "rename source columns to the fields rlmt reads, {field: column}, e.g. "
                            "{prompt: question, answer: solution}")
    demonstrations: str = doc("", "SFT rows (prompt, completion, optional reward) for return-weighted optimization")
    chat: bool = doc(True, "format prompts with the tokenizer's chat template")
    system_prompt: Optional[str] = doc(None, "system message for chat prompts (None: the template's default)")
    max_prompt_tokens: int = doc(256, "longest allowed prompt, in tokens")
    max_completion_tokens: int = doc(256, "completions of offline rows (SFT, preference, steps) are truncated to this many "
                                               "tokens (counted)")
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
class EnvConfig:
    source: str = doc("", "multi-turn environment (rlmt.envs.REGISTRY name or 'module:Class'); '' = the single-turn "
                          "environment: one response per prompt, scored by reward.source")
    args: dict = doc({}, "keyword arguments of the environment")
    max_turns: int = doc(4, "most assistant turns in an episode; an episode still running after them is truncated")
    max_total_tokens: int = doc(1024, "most tokens in an episode after its first prompt (assistant, tool and "
                                      "environment turns together); reaching it truncates the episode")
    tools: list = doc([], "tools the model may call: 'calculator', 'python' (in the sandbox), or 'module:function' "
                          "(a user function with a `schema` attribute or a typed signature)")
    tool_timeout_s: float = doc(5.0, "wall-clock limit of one tool call; a call past it is killed and reported to "
                                     "the model as an error")
    tool_output_chars: int = doc(2000, "a tool's reply is cut to this many characters before the model sees it")
    step_workers: int = doc(8, "episodes whose environment steps (tool calls included) at once, on threads, for "
                               "an environment class that declares thread_safe = True (the built-in ones do): a "
                               "hung tool then stalls a turn for tool_timeout_s per step_workers calls, not per "
                               "call. 1: one after another")


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
    kl_estimator: Optional[Literal["k3", "k1"]] = doc(
        None, "per-token KL estimator (k1 = log pi - log pi_ref; k3 >= 0); unset: the method's convention "
              "(k3 in the loss; k1 in PPO's per-token reward)")
    kl_in_reward: Optional[bool] = doc(
        None, "put beta * KL into the reward (PPO: per token; other methods: summed into the sequence reward) "
              "instead of the loss; unset: the method's convention (PPO: true, others: false)")
    epochs: int = doc(1, "optimization epochs over each rollout batch (1: no second pass for pi_old)")
    minibatches: int = doc(1, "optimizer steps per epoch (the rollout batch is split into this many)")
    aggregation: Optional[Literal["token_mean", "seq_mean", "seq_sum", "constant"]] = doc(
        None, "loss reduction, normalized over the whole minibatch (accumulation-invariant); unset: the method's "
              "convention (token_mean; GSPO: seq_mean, one term per sequence)")
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
    critic_lr: Optional[float] = doc(None, "peak learning rate of the value head, its own AdamW parameter group "
                                           "on the same schedule (None: optim.lr)")


@dataclass(frozen=True)
class TRPOConfig:
    max_kl: float = doc(0.01, "delta: the trust region, mean KL(pi_old || pi) over response tokens")
    cg_iters: int = doc(10, "conjugate-gradient iterations for F^-1 g")
    cg_damping: float = doc(0.1, "damping added to the Fisher-vector product (F + damping * I)")
    fisher_fraction: float = doc(1.0, "share of each group's samples whose KL the Fisher-vector products use: "
                                      "samples g with g % k == 0, k = round(1 / fisher_fraction) (at most the "
                                      "group size); 1: all. Each product costs a forward-mode pass, a forward and a "
                                      "backward over those sequences, so 0.25 makes conjugate gradient ~4x cheaper "
                                      "(the original TRPO's subsampled Fisher)")
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
class CriticConfig:
    backend: Literal["local", "http"] = doc("local", "local: a model in this process; http: an OpenAI-compatible server")
    model: str = doc("smollm2-135m-instruct", "local: the model to load (as model.name); http: the served model's name")
    base_url: Optional[str] = doc(None, "http: the server's base URL, e.g. http://127.0.0.1:8000/v1 (required)")
    api_key_env: Optional[str] = doc(None, "http: environment variable holding the API key (unset: OPENAI_API_KEY)")
    concurrency: Optional[int] = doc(None, "http: requests in flight at once (unset: 4)")
    timeout_s: Optional[float] = doc(None, "http: seconds per request (unset: 30)")
    retries: Optional[int] = doc(None, "http: retries of a failed request (unset: 3)")
    backoff_s: Optional[float] = doc(None, "http: first retry delay, doubled each retry (unset: 0.5)")
    cache_path: Optional[str] = doc(None, "http: JSONL file caching replies across runs (unset: none)")
    price_input_per_1k: Optional[float] = doc(None, "http: price per 1k prompt tokens, for the cost report")
    price_output_per_1k: Optional[float] = doc(None, "http: price per 1k completion tokens, for the cost report")
    max_batch: Optional[int] = doc(None, "local, json mode: requests generated together (unset: 16)")
    batch_size: Optional[int] = doc(None, "local, logprobs mode: critiques scored per forward pass (unset: 8)")
    device: Optional[str] = doc(None, "local: 'cpu' or 'cuda' (unset: cpu)")
    dtype: Optional[str] = doc(None, "local, json mode: the critic's weight dtype (unset: float32)")
    seed: Optional[int] = doc(None, "local: the critic's sampling seed (unset: 0)")
    cache: Optional[bool] = doc(None, "local, json mode: reuse replies to identical requests (unset: true)")
    max_tokens: Optional[int] = doc(None, "json mode: longest critique, in tokens (unset: 256)")
    require_ref: Optional[bool] = doc(None, "json mode: a critique must quote the request's nonce ref (unset: true)")


@dataclass(frozen=True)
class GrapeConfig:
    rubric: str = doc("", "rubric YAML: categories, system prompts and weighted items (see examples/grape/)")
    critic: CriticConfig = section(CriticConfig, "the critic that scores judged rubric items (rlmt.grape.critic)")
    critic_mode: Literal["json", "logprobs"] = doc(
        "json", "json: the critic writes reasoning + JSON score/confidence; logprobs (local only): score and "
                "confidence read from the critic's distribution over the score digits")
    gate_on_verifiable: bool = doc(True, "items with `gated_by` are skipped (missing) when their gate item "
                                                      "failed (scored below 0.5, or was not scored)")
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
    output: str = doc("", "`rlmt eval`: also write every scored sample to this JSONL (training runs "
                               "with run.eval_before_after write RUN_DIR/eval-before.jsonl and eval-after.jsonl)")


# run.trackers: each tracker's name -> the keys run.tracker_args.<name> takes (None: wandb.init's, checked when
# the run starts, rlmt.trackers.check_trackers)
TRACKER_SETTINGS: dict[str, Optional[tuple[str, ...]]] = {
    "tensorboard": ("log_dir",),
    "wandb": None,
    "mlflow": ("tracking_uri", "experiment_name", "run_name", "tags"),
}


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = doc("runs/run", "run directory (config, metrics.jsonl, checkpoints/, final/)")
    seed: int = doc(0, "seed for data order, sampling and initialisation")
    save_every: int = doc(0, "checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "keep this many most recent checkpoints")
    resume: str = doc("false", "'false', 'true' (the newest complete checkpoint in output_dir; a newer corrupt one "
                               "is set aside with a warning) or a checkpoint path")
    allow_config_change: bool = doc(
        False, "resume although training-relevant keys differ from the checkpoint's config (lr, batch size, schedule, "
               "steps, data, ...; rlmt.config.changes lists the keys that may always change): the changes are "
               "printed and take effect; false refuses such a resume. A longer run (optim.max_steps or optim.epochs "
               "grown) under a constant schedule is always allowed")
    log_every: int = doc(1, "print a metrics line every N steps")
    trackers: list = doc([], "experiment trackers that also get each step's metrics and the resolved config as the "
                             "run's parameters, any of 'tensorboard', 'wandb', 'mlflow' (extras .[tensorboard], "
                             ".[wandb], .[mlflow]); rank 0 logs")
    tracker_args: dict = doc({}, "per tracker, its settings: wandb: keyword arguments of wandb.init (mode: offline, "
                                 "project, entity, dir, tags, ...); mlflow: tracking_uri (default: a file store "
                                 "<output_dir>/mlruns, or MLFLOW_TRACKING_URI), experiment_name, run_name, tags; "
                                 "tensorboard: log_dir")
    tensorboard: bool = doc(False, "true: the same as listing 'tensorboard' in run.trackers")
    progress: bool = doc(True, "show a progress bar with ETA")
    eval_before_after: bool = doc(False, "evaluate on data.eval before and after training")


@dataclass(frozen=True)
class DistConfig:
    backend: Optional[Literal["gloo", "nccl"]] = doc(
        None, "torch.distributed backend when started by torchrun (None: nccl on CUDA, gloo on CPU)")
    timeout_s: float = doc(600.0, "collective timeout: a rank that died or hangs ends the job with an error after this")


@dataclass(frozen=True)
class Config:
    algorithm: Literal["sft", "rejection_sampling", "reinforce", "grpo", "gspo", "ppo", "trpo", "dpo",
                       "reward_model", "process_reward_model", "grape", "pipeline"] = doc(
        "sft", "training method (docs/methods.md)")
    model: ModelConfig = section(ModelConfig, "the policy")
    data: DataConfig = section(DataConfig, "datasets and prompt formatting")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batching")
    sft: SFTConfig = section(SFTConfig, "supervised fine-tuning options")
    rollout: RolloutConfig = section(RolloutConfig, "sampling for online methods")
    reward: RewardConfig = section(RewardConfig, "the reward source")
    env: EnvConfig = section(EnvConfig, "multi-turn environments and tools for online methods (rlmt.envs)")
    rejection: RejectionConfig = section(RejectionConfig, "rejection sampling")
    pg: PolicyGradientConfig = section(PolicyGradientConfig, "policy-gradient methods (REINFORCE, GRPO, GSPO, PPO, TRPO, "
                                                                   "GRAPE)")
    ppo: PPOConfig = section(PPOConfig, "PPO: value head, GAE, value loss")
    trpo: TRPOConfig = section(TRPOConfig, "TRPO: trust region, conjugate gradient, line search")
    dpo: DPOConfig = section(DPOConfig, "DPO and its variants: offline preference pairs against a frozen reference")
    rm: RewardModelConfig = section(RewardModelConfig, "reward models: outcome (Bradley-Terry) and process (per step)")
    grape: GrapeConfig = section(GrapeConfig, "GRAPE: rubric rewards from confidence-weighted critiques")
    stages: list = doc([], "pipeline: ordered stages [{name, ...config keys}], each merged over this config; "
                           "'${NAME}' in a value is stage NAME's final/ directory")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    runtime: RuntimeConfig = section(RuntimeConfig, "process settings applied when a run starts: threads, allocator")
    dist: DistConfig = section(DistConfig, "several processes (torchrun, rlmt train --nproc-per-node N): backend, timeout")
    run: RunConfig = section(RunConfig, "run directory, seeding, checkpoints, logging")
