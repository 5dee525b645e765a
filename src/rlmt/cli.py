"""The ``rlmt`` command line: train, eval, generate, demo, report, serve, judge.

Bad input (config, data, model) ends with a one-line error naming the file, line and field, and a non-zero
exit code; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """\
config: a YAML file of the keys listed by `rlmt train --help-config`, then key=value overrides
(dotted keys, YAML values), e.g.  rlmt train cfg.yaml optim.lr=1e-5 rollout.num_samples=8

exit codes: 0 ok, 2 bad input (config, data, model), 1 an error inside rlmt
"""


def _quiet_transformers() -> None:
    """Quieter transformers logs. The hub settings (HF_HUB_OFFLINE, the cache) stay the user's: local models
    and data are read without the network (:mod:`rlmt.models.loading`), a hub id as transformers resolves it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def _load(args):
    from rlmt.config import load_config

    return load_config(args.config, args.overrides)


def huge_pages_env(args: argparse.Namespace) -> bool:
    """Whether this command should run with ``THP_MEM_ALLOC_ENABLE=1``: on Linux, a command that starts a run
    (train, eval, generate, demo) whose config says ``runtime.huge_pages``.

    torch reads the variable once, at its first CPU allocation, so :func:`main` decides before torch loads; the
    config is read as the command will read it (YAML and overrides; no torch). A config that does not load
    gives False, and the command then reports its error."""
    if not sys.platform.startswith("linux") or args.command not in ("train", "eval", "generate", "demo"):
        return False
    from rlmt.config import ConfigError, load_config

    try:
        if args.command == "demo":
            from rlmt.demo import DEMO_CONFIG

            return load_config(None, args.overrides, base=DEMO_CONFIG).runtime.huge_pages
        return _load(args).runtime.huge_pages
    except ConfigError:
        return False


def _print_runtime_note() -> None:
    """After a command's run: the one-line note of its runtime settings, if they have one (huge pages asked for
    and not in effect); after the output, so an error stays the only line of a failed command."""
    from rlmt.runtime import applied

    state = applied()
    if state is not None and state.note:
        print(f"note: {state.note}", file=sys.stderr)


def launch_command(args) -> list[str]:
    """``rlmt train --nproc-per-node N ...`` -> the torchrun command that starts the N processes, each running
    ``python -m rlmt train`` with the same config and overrides. One node: torchrun's ``--standalone``
    (a local rendezvous on a free port); several: ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}"]
    if args.nnodes and args.nnodes != "1":
        if not args.rdzv_endpoint:
            raise SystemExit("error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                f"--rdzv-id={args.rdzv_id}"]
        if args.node_rank is not None:
            cmd.append(f"--node-rank={args.node_rank}")
    else:
        cmd.append("--standalone")
    return cmd + ["-m", "rlmt", "train"] + ([args.config] if args.config else []) + list(args.overrides)


def launch(args) -> int:
    """Start the ranks through torchrun, in this process (as torchtune's ``tune run`` does); what can be checked
    from the config alone is checked first, so it is one line here rather than one per rank. A rank that fails
    has printed its own error; torchrun then stops the others, and this returns that rank's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from rlmt.config import with_method_defaults
    from rlmt.train.session import check_distributed

    cfg = with_method_defaults(_load(args))
    nnodes = int(str(args.nnodes).split(":")[-1])
    check_distributed(cfg, args.nproc_per_node * nnodes)
    # the ranks' OpenMP threads: this node's cores shared among its processes (torchrun's default is 1),
    # unless the user set them (runtime.threads still sets torch's own count in each rank)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    torchrun_args = get_args_parser().parse_args(launch_command(args)[3:])
    try:
        run(torchrun_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"error: rank {rank} failed (exit code {failure.exitcode}); its output is above", file=sys.stderr)
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0


def cmd_train(args) -> int:
    if args.nproc_per_node and "WORLD_SIZE" not in os.environ:  # the launcher, not yet one of the ranks
        return launch(args)
    cfg = _load(args)  # config errors are reported before the heavy imports
    from rlmt.train.runner import train

    run_dir = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        _print_runtime_note()
        print(f"run written to {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from rlmt.config import ConfigError
    from rlmt.data import SourceOptions, check_prompt_lengths, load_rows
    from rlmt.rewards import build_reward_source, check_reward_fields, check_reward_source
    from rlmt.evaluate import write_samples
    from rlmt.evaluate import evaluate
    from rlmt.train.session import start_run

    cfg = _load(args)
    path = cfg.data.eval or cfg.data.train
    if not path:
        raise ConfigError("data.eval: set data.eval (or data.train) to a prompt file")
    if cfg.env.source:  # episodes in an environment (rlmt.envs): success = return >= reward.pass_threshold
        return _eval_env(cfg, path)
    check_reward_source(cfg)
    report = load_rows(path, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts,
                       SourceOptions.of(cfg.data, "eval" if cfg.data.eval else "train"))
    rows = check_reward_fields(cfg, report.rows, report)  # before the model loads
    _, lm, fmt = start_run(cfg)
    rows = check_prompt_lengths(rows, lm.tokenizer, fmt, cfg.data.max_prompt_tokens, cfg.data.on_invalid, report)
    report.require(len(rows))
    source = build_reward_source(cfg.reward.source, cfg.reward.args)
    metrics, samples = evaluate(lm.model, lm.tokenizer, fmt, rows, source, cfg.eval.num_samples,
                                cfg.eval.temperature, cfg.eval.max_new_tokens, cfg.run.seed,
                                cfg.rollout.batch_prompts, cfg.reward.pass_threshold, stop=cfg.rollout.stop,
                                invalid_as_none=cfg.reward.invalid_as_none, autocast=lm.autocast,
                                progress=cfg.run.progress)
    out = Path(cfg.eval.output) if cfg.eval.output else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_samples(out, samples)
    print(json.dumps({"model": cfg.model.name, "data": path, **metrics}, indent=1))
    _print_runtime_note()
    return 0


def _eval_env(cfg, path: str) -> int:
    from rlmt.data import SourceOptions, load_rows
    from rlmt.envs import env_factory, toolbox_for
    from rlmt.envs.base import check_env_fields
    from rlmt.envs.evaluate import evaluate_env, write_episodes
    from rlmt.train.session import start_run

    env_factory(cfg, toolbox_for(cfg))  # the environment, its args and tools: checked before the model loads
    report = load_rows(path, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts,
                       SourceOptions.of(cfg.data, "eval" if cfg.data.eval else "train"))
    report.require(len(report.rows))
    rows = [r.data for r in check_env_fields(cfg, report.rows, report)]
    _, lm, fmt = start_run(cfg)
    K = cfg.eval.num_samples
    metrics, episodes = evaluate_env(cfg, lm, fmt, rows, K, cfg.eval.temperature, cfg.eval.max_new_tokens,
                                     cfg.run.seed)
    if cfg.eval.output:
        out = Path(cfg.eval.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_episodes(out, episodes, [rows[i // K] for i in range(len(episodes.episodes))])
    print(json.dumps({"model": cfg.model.name, "data": path, "env": cfg.env.source, "tools": list(cfg.env.tools),
                      **metrics}, indent=1))
    _print_runtime_note()
    return 0


def cmd_generate(args) -> int:
    import torch

    from rlmt.config import ConfigError
    from rlmt.data import SourceOptions, encode_prompt, load_rows
    from rlmt.records import progress_bar
    from rlmt.rollout import SamplingParams, generate, weights_shared
    from rlmt.train.session import start_run

    cfg = _load(args)
    if args.prompt:
        prompts = [{"prompt": p} for p in args.prompt]
    else:  # read before the model loads
        path = cfg.data.eval or cfg.data.train
        if not path:
            raise ConfigError("data.eval: give --prompt TEXT or set data.eval / data.train")
        source = SourceOptions.of(cfg.data, "eval" if cfg.data.eval else "train")
        prompts = [r.data for r in load_rows(path, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts, source).rows]
    _, lm, fmt = start_run(cfg)
    params = SamplingParams(cfg.rollout.num_samples, cfg.rollout.temperature, cfg.rollout.top_p,
                            cfg.rollout.max_new_tokens, tuple(cfg.rollout.stop))
    gen = torch.Generator(device=next(lm.model.parameters()).device).manual_seed(cfg.run.seed)
    out = open(args.output, "w") if args.output else sys.stdout
    with progress_bar(len(prompts), "generate", "prompt", cfg.run.progress) as bar, weights_shared():
        for start in range(0, len(prompts), cfg.rollout.batch_prompts):
            chunk = prompts[start:start + cfg.rollout.batch_prompts]
            batch = generate(lm.model, lm.tokenizer, [encode_prompt(lm.tokenizer, fmt, p["prompt"]) for p in chunk],
                             params, gen, lm.autocast)
            lines = "".join(json.dumps({"prompt": chunk[int(batch.prompt_index[i])]["prompt"], "response": text})
                            + "\n" for i, text in enumerate(batch.texts))
            if out is sys.stdout:  # above the bar, not through it
                bar.write(lines, file=out, end="")
            else:
                out.write(lines)
            bar.update(len(chunk))
    if out is not sys.stdout:
        out.close()
    _print_runtime_note()
    return 0


def cmd_demo(args) -> int:
    from rlmt.demo import run_demo

    code = run_demo(args.output_dir, args.overrides)
    _print_runtime_note()
    return code


def cmd_report(args) -> int:
    from rlmt.report import write_report

    try:
        path = write_report(Path(args.run_dir), Path(args.output) if args.output else None)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


def cmd_serve(args) -> int:
    from rlmt.serve import serve

    return serve(args.model, args.host, args.port, args.max_batch, args.seed, args.device)


def cmd_judge(args) -> int:
    from rlmt.chat import build_chat_backend
    from rlmt.config import ConfigError
    from rlmt.judge import (DEFAULT_PREAMBLE, PairwiseJudge, load_judge_rows, preference_dataset,
                            sample_responses, write_jsonl_atomic)

    if args.judge_backend == "http" and not (args.base_url and args.model):
        raise ConfigError("--judge-backend http needs --base-url URL and --model NAME")
    rows, responses = load_judge_rows(args.rows, need_responses=not args.policy)
    if args.policy:
        if args.num_samples < 2:
            raise ConfigError("--num-samples: need at least 2 responses per prompt to compare")
        responses = sample_responses(args.policy, [r["prompt"] for r in rows], args.num_samples,
                                     args.temperature, args.max_new_tokens, args.seed)
    spec = ({"backend": "http", "base_url": args.base_url, "model": args.model, "concurrency": args.concurrency,
             "timeout_s": args.timeout, "cache_path": args.cache} if args.judge_backend == "http" else
            {"backend": "local", "model": args.judge_model, "seed": args.seed})
    if args.preamble_file and not Path(args.preamble_file).is_file():
        raise ConfigError(f"--preamble-file: {args.preamble_file} does not exist")
    preamble = Path(args.preamble_file).read_text() if args.preamble_file else DEFAULT_PREAMBLE
    try:
        backend = build_chat_backend(spec)
    except ValueError as e:
        raise ConfigError(f"judge backend: {e}") from e
    judge = PairwiseJudge(backend, preamble, args.chain_of_thought)
    prefs, stats = preference_dataset(rows, responses, judge, args.pairs, args.max_pairs)
    if stats["pairs"] == stats["missing"]:  # no pair, or no verdict at all (every call failed or did not parse)
        print(json.dumps({"out": None, **stats, **judge.backend.stats.as_metrics("chat")}))
        print(f"error: nothing was judged ({stats['pairs']} pairs, {stats['missing']} without a verdict); "
              f"{args.out} was not written", file=sys.stderr)
        return 1
    write_jsonl_atomic(args.out, prefs)
    print(json.dumps({"out": args.out, **stats, **judge.backend.stats.as_metrics("chat")}))
    return 0


def cmd_help_config(_args=None) -> int:
    from rlmt.config import describe

    for key, default, text in describe():
        if default == "":
            print(f"\n{key}:  {text}")
        else:
            print(f"  {key} = {default}\n      {text}")
    import inspect

    from rlmt.rewards import REGISTRY, reward_source_class

    print("\nreward sources (reward.source) and the reward.args each takes:")
    for name in sorted(REGISTRY):
        cls = reward_source_class(name)
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        shown = lambda v: repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."  # noqa: E731
        args = ", ".join(p.name + ("" if p.default is inspect.Parameter.empty else f"={shown(p.default)}")
                         for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        print(f"  {name}: {summary}\n      args: {args or '(none)'}")
    return 0


def _version() -> str:
    """``rlmt X`` and the torch beside it (read from the installed metadata: no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    import rlmt

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"rlmt {rlmt.__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlmt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="rlmt: post-training for language models (SFT, rejection sampling, RL, preferences, GRAPE).",
        epilog=EPILOG)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(sp, optional=False):
        sp.add_argument("config", nargs="?" if optional else None, help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
        sp.set_defaults(_sub=sp)

    t = sub.add_parser("train", help="train with the method in `algorithm:` (sft, rejection_sampling, ...)",
                       description="Train a model as the config says; writes config.yaml, metrics.jsonl, "
                                   "checkpoints/ and final/ under run.output_dir. run.resume=true continues a run.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    with_config(t, optional=True)
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.add_argument("--nproc-per-node", type=int, default=0, metavar="N",
                   help="start N processes on this node through torchrun (gloo on CPU, nccl on GPUs: one GPU each)")
    t.add_argument("--nnodes", default="1", help="torchrun: number of nodes (several: give --rdzv-endpoint too)")
    t.add_argument("--node-rank", type=int, default=None, help="torchrun: this node's rank (0 .. nnodes - 1)")
    t.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT", help="torchrun: the rendezvous address, "
                   "the same on every node (e.g. node 0's address and a free port)")
    t.add_argument("--rdzv-id", default="rlmt", help="torchrun: the job id, the same on every node")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="mean reward and pass@1 of a model on data.eval with the reward source",
                       description="Sample eval.num_samples responses per prompt of data.eval (or data.train) at "
                                   "eval.temperature, score them with reward.source, print mean reward, pass@1 and "
                                   "pass@K; eval.output writes every sample to JSONL.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    with_config(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample responses to prompts (a data file or --prompt) as JSONL",
                       description="Sample rollout.num_samples responses per prompt with the rollout settings; "
                                   "prompts from --prompt or from data.eval / data.train.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    with_config(g, optional=True)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); skips the data file")
    g.add_argument("--output", help="write JSONL here instead of stdout")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the main job: train the embedded model on a verifiable task, before/after numbers",
                       description="Runs the built-in demo on the embedded SmolLM2-135M-Instruct (CPU, a few "
                                   "minutes) and prints held-out accuracy before and after training.")
    d.add_argument("--output-dir", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="an HTML report of a run directory: eval before/after, metric plots, samples",
                       description="Write RUN_DIR/report.html, one self-contained page (plots inline), from "
                                   "config.yaml, metrics.jsonl, summary.json and, when present, "
                                   "eval-before/after.json and .jsonl: header with the measured wall time, "
                                   "before/after table, reward/KL/approx_kl/length/loss/rubric plots, sample "
                                   "responses.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run.output_dir of a training run)")
    r.add_argument("--output", metavar="FILE", help="write the HTML here instead of RUN_DIR/report.html")
    r.set_defaults(func=cmd_report)

    s = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API (chat and text completions)",
                       description="Load MODEL and answer POST /v1/chat/completions, POST /v1/completions and "
                                   "GET /v1/models (stream, n, stop, top_p, seed; an unsupported field is a 400 "
                                   "naming it), batching concurrent requests. Prints one line `rlmt serve: "
                                   "listening on http://HOST:PORT/v1` once ready; --port 0 picks a free port.")
    s.add_argument("--model", required=True, help="tiny-random, smollm2-135m-instruct or a model directory")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    s.add_argument("--max-batch", type=int, default=16, help="most requests generated together (default 16)")
    s.add_argument("--seed", type=int, default=0, help="seed of requests that give none (default 0)")
    s.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu; the default), "
                                                    "cpu, cuda, cuda:N")
    s.set_defaults(func=cmd_serve)

    j = sub.add_parser("judge", help="RLAIF: judge response pairs in both orders, write DPO preference JSONL",
                       description="Each row of --rows has `prompt` and `responses` (>= 2 strings; or give "
                                   "--policy to sample them). Pairs are judged in both orders; only consistent, "
                                   "decisive verdicts are written to --out as {prompt, chosen, rejected}.")
    j.add_argument("--rows", required=True, help="JSONL of {prompt, responses}")
    j.add_argument("--out", required=True, help="preference JSONL to write (atomically)")
    j.add_argument("--judge-backend", choices=["http", "local"], default="http", help="default http")
    j.add_argument("--base-url", help="http: the endpoint, e.g. http://127.0.0.1:8000/v1")
    j.add_argument("--model", help="http: the model name to send")
    j.add_argument("--judge-model", default="smollm2-135m-instruct", help="local: the judge model")
    j.add_argument("--concurrency", type=int, default=4, help="http: requests in flight (default 4)")
    j.add_argument("--timeout", type=float, default=30.0, help="http: seconds per request (default 30)")
    j.add_argument("--cache", help="http: JSONL reply cache, reloaded on start")
    j.add_argument("--pairs", choices=["adjacent", "all"], default="adjacent", help="which pairs to compare")
    j.add_argument("--max-pairs", type=int, default=0, help="at most this many pairs per row (0: no cap)")
    j.add_argument("--chain-of-thought", action="store_true", help="ask the judge to reason before the verdict")
    j.add_argument("--preamble-file", help="a text file replacing the judge's default preamble")
    j.add_argument("--policy", help="sample the responses from this model instead of reading them")
    j.add_argument("--num-samples", type=int, default=4, help="with --policy: responses per prompt (default 4)")
    j.add_argument("--temperature", type=float, default=1.0, help="with --policy: sampling temperature")
    j.add_argument("--max-new-tokens", type=int, default=128, help="with --policy: response length cap")
    j.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    j.set_defaults(func=cmd_judge)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as :func:`main` reads it (a config argument with ``=`` that is no file is an override)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config] + list(args.overrides)  # only overrides were given
        args.config = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 0
    if args.func is cmd_train and not (args.config or args.overrides or args.help_config):
        args._sub.print_usage(sys.stderr)  # `rlmt train` alone: what to give it, not a missing-data error
        print("rlmt train: give a config file and/or key=value overrides, e.g. `rlmt train examples/grpo.yaml`; "
              "`rlmt train --help` for the options, `--help-config` for every key", file=sys.stderr)
        return 2
    if getattr(args, "help_config", False):
        return cmd_help_config()
    if "torch" not in sys.modules and huge_pages_env(args):  # torch reads it at its first allocation
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # the user's own value wins
    _quiet_transformers()
    from rlmt.config import ConfigError
    from rlmt.data import DataError
    from rlmt.models import ModelError
    from rlmt.rewards import RewardError
    from rlmt.parallel.consistency import ConfigMismatch
    from rlmt.parallel.shard import ShardError
    from rlmt.train.session import RunError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, RunError, ShardError, ConfigMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
