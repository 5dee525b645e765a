"""rlmt.runtime: the run's process settings (cfg.runtime). Importing rlmt changes nothing; apply_runtime fixes the
mmap threshold and resolves the trims; the command line turns huge pages on before torch loads. The allocator
checks run in fresh processes (torch reads THP_MEM_ALLOC_ENABLE once per process, mallopt is process-global)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from rlmt import runtime
from rlmt.cli import huge_pages_env, parse_args
from rlmt.config import RuntimeConfig, load_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and THP are Linux's")

BLOCKS_MB = 20 * 5  # the probe's freed 5 MiB tensors

_PROBE = r"""
import dataclasses, importlib, json, os, re, sys
spec = json.loads(sys.argv[1])
env_before = dict(os.environ)
for name in spec["imports"]:
    importlib.import_module(name)
import torch
from rlmt import runtime
from rlmt.config import RuntimeConfig

def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

out = {"env_unchanged": dict(os.environ) == env_before, "applied_after_import": runtime.applied() is not None}
if spec["apply"] is not None:
    state = runtime.apply_runtime(RuntimeConfig(**spec["apply"]), "cpu")
    out["state"], out["note"] = dataclasses.asdict(state), state.note
out["huge"], out["per_layer_trim"] = runtime.huge_page_tensors(), runtime.per_layer_trim()
# what fragmentation looks like: 5 MiB activations freed between blocks that stay alive. Under glibc's
# adaptive threshold the first free of a mapped block raises it, and later blocks come from the heap and
# stay resident when freed (until malloc_trim hands the free heap back)
torch.ones(5 << 18)  # 5 MiB of float32, mapped and freed at once
blocks = [torch.ones(5 << 18) for _ in range(40)]  # touched
before = rss_mb()
del blocks[0::2]  # every other one: each freed block lies between live ones, never at the heap's top
freed = rss_mb()
runtime.release_free_heap()
out["freed_mb"], out["trimmed_mb"] = before - freed, freed - rss_mb()
print("RESULT " + json.dumps(out))
"""


def _result(stdout: str) -> dict:
    return json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])


def _env(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    full.update(env)
    return full


def _probe(apply: dict | None = None, imports: tuple[str, ...] = (), **env: str) -> dict:
    spec = json.dumps({"apply": apply, "imports": list(imports)})
    res = subprocess.run([sys.executable, "-c", _PROBE, spec], capture_output=True, text=True, env=_env(**env),
                         timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return _result(res.stdout)


# ------------------------------------------------------------------------------------- importing rlmt

IMPORTS = ("rlmt", "rlmt.config", "rlmt.models", "rlmt.train.online")


def test_importing_rlmt_changes_nothing_and_the_free_heap_is_still_trimmed():
    """No THP_MEM_ALLOC_ENABLE appears, so torch keeps its default (no huge pages); no mmap threshold is fixed,
    so freed 5 MiB tensors stay in the heap; nothing is applied, so the per-layer trim is on and
    release_free_heap trims, as before any run."""
    out = _probe(None, IMPORTS)
    assert out["env_unchanged"] is True and out["applied_after_import"] is False
    assert out["huge"] is False and out["per_layer_trim"] is True
    assert out["freed_mb"] < 0.5 * BLOCKS_MB  # the freed blocks stay in the heap ...
    assert out["trimmed_mb"] > 0.9 * BLOCKS_MB  # ... until the trim returns them


# ------------------------------------------------------------------------------------- apply_runtime


def test_defaults_with_huge_pages_fix_the_threshold_and_drop_the_layer_trim():
    """Huge pages in effect: a 4 MiB mmap threshold and no per-layer trim; freed 5 MiB tensors go back to the OS
    at once although live blocks sit between."""
    out = _probe({}, THP_MEM_ALLOC_ENABLE="1")
    state = {k: v for k, v in out["state"].items() if k not in ("threads", "openmp_dynamic")}
    assert state == {"huge_pages": True, "huge_pages_active": True, "mmap_threshold": 4 << 20, "heap_trim": True,
                     "layer_trim": False}
    assert out["note"] is None and out["huge"] is True and out["per_layer_trim"] is False
    assert out["freed_mb"] > 0.9 * BLOCKS_MB


def test_defaults_without_huge_pages_keep_glibcs_threshold_and_the_trims():
    """``THP_MEM_ALLOC_ENABLE=0`` is respected: glibc's adaptive threshold, both trims, freed blocks stay resident
    until the trim between phases; the state says huge pages were asked for and are not in effect."""
    out = _probe({}, THP_MEM_ALLOC_ENABLE="0")
    state = out["state"]
    assert state["huge_pages"] is True and state["huge_pages_active"] is False
    assert state["mmap_threshold"] == 0 and state["layer_trim"] is True and state["heap_trim"] is True
    assert "huge_pages" in out["note"] and out["per_layer_trim"] is True
    assert out["freed_mb"] < 0.5 * BLOCKS_MB
    assert out["trimmed_mb"] > 0.9 * BLOCKS_MB


def test_an_explicit_threshold_wins():
    """``runtime.mmap_threshold`` sets it either way; without huge pages the per-layer trim stays ('auto')."""
    out = _probe({"mmap_threshold": 1 << 20}, THP_MEM_ALLOC_ENABLE="0")
    assert out["state"]["mmap_threshold"] == 1 << 20 and out["per_layer_trim"] is True
    assert out["freed_mb"] > 0.9 * BLOCKS_MB
    out = _probe({"mmap_threshold": 0}, THP_MEM_ALLOC_ENABLE="1")  # glibc's adaptive one beside huge pages
    assert out["state"]["mmap_threshold"] == 0 and out["per_layer_trim"] is True


def test_heap_trim_off_makes_release_free_heap_a_no_op():
    """The freed blocks stay resident through release_free_heap (compare the two tests above, where it returns
    them)."""
    out = _probe({"heap_trim": False}, THP_MEM_ALLOC_ENABLE="0")
    assert out["state"]["heap_trim"] is False
    assert out["freed_mb"] < 0.5 * BLOCKS_MB
    assert out["trimmed_mb"] < 0.1 * BLOCKS_MB


@pytest.fixture
def fresh_state(monkeypatch):
    """apply_runtime in this process, with the module state and torch's threads put back afterwards (the
    settings used here never call mallopt: an explicit 0 threshold, or a device other than the CPU)."""
    monkeypatch.setattr(runtime, "_applied", None)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_layer_trim_on_and_off_are_taken_as_given(fresh_state):
    assert runtime.apply_runtime(RuntimeConfig(mmap_threshold=0, layer_trim="off"), "cpu").layer_trim is False
    assert runtime.per_layer_trim() is False
    assert runtime.apply_runtime(RuntimeConfig(mmap_threshold=0, layer_trim="on"), "cpu").layer_trim is True
    assert runtime.per_layer_trim() is True


def test_off_the_cpu_the_allocator_settings_are_no_ops_but_threads_apply(fresh_state):
    state = runtime.apply_runtime(RuntimeConfig(threads=1, layer_trim="on"), "cuda")
    assert state.threads == 1 == torch.get_num_threads()
    assert state.mmap_threshold == 0 and state.heap_trim is False and state.layer_trim is False
    assert state.huge_pages is False and state.note is None
    assert runtime.applied() is state


def test_start_run_applies_the_runtime_section(fresh_state, tmp_path):
    from rlmt.train.session import start_run

    cfg = load_config(None, ["model.name=tiny-random", f"run.output_dir={tmp_path}", "runtime.threads=1",
                             "runtime.mmap_threshold=0", "runtime.layer_trim='off'", "runtime.heap_trim=false"])
    start_run(cfg)
    state = runtime.applied()
    assert (state.threads, state.mmap_threshold, state.heap_trim, state.layer_trim) == (1, 0, False, False)
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------------------------- the command line


def test_huge_pages_env_reads_the_config_as_the_command_will(tmp_path):
    on = tmp_path / "on.yaml"
    on.write_text(yaml.safe_dump({"model": {"name": "tiny-random"}}))
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({"runtime": {"huge_pages": False}}))
    assert huge_pages_env(parse_args(["train", str(on)])) is True  # the default
    assert huge_pages_env(parse_args(["train", "model.name=tiny-random"])) is True  # overrides only
    assert huge_pages_env(parse_args(["train", str(on), "runtime.huge_pages=false"])) is False
    assert huge_pages_env(parse_args(["eval", str(off)])) is False
    assert huge_pages_env(parse_args(["generate", str(off), "runtime.huge_pages=true"])) is True  # override wins
    assert huge_pages_env(parse_args(["demo", "runtime.huge_pages=false"])) is False
    assert huge_pages_env(parse_args(["demo"])) is True


def test_huge_pages_env_is_false_for_a_config_that_does_not_load_and_for_commands_without_a_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime: {huge_page: true}\n")  # mistyped key: the command reports it
    assert huge_pages_env(parse_args(["train", str(bad)])) is False
    assert huge_pages_env(parse_args(["train", str(tmp_path / "missing.yaml")])) is False
    assert huge_pages_env(parse_args(["report", str(tmp_path)])) is False
    assert huge_pages_env(parse_args(["serve", "--model", "tiny-random"])) is False


_CLI = r"""
import json, os, sys
from rlmt.cli import main
assert "torch" not in sys.modules
code = main(sys.argv[1:])
from rlmt import runtime
state = runtime.applied()
print("RESULT " + json.dumps({"code": code, "env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                              "huge_pages_active": state.huge_pages_active, "mmap_threshold": state.mmap_threshold}))
"""

GENERATE = ["generate", "--prompt", "hi", "model.name=tiny-random", "model.device=cpu", "rollout.num_samples=1",
            "rollout.max_new_tokens=1"]


def _cli(*overrides: str, **env: str) -> tuple[dict, str]:
    res = subprocess.run([sys.executable, "-c", _CLI, *GENERATE, *overrides], capture_output=True, text=True,
                         env=_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env), timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return _result(res.stdout), res.stderr


def test_the_command_line_turns_huge_pages_on_before_torch_loads():
    out, err = _cli()
    assert out == {"code": 0, "env": "1", "huge_pages_active": True, "mmap_threshold": 4 << 20}
    assert "note:" not in err


def test_the_command_line_leaves_huge_pages_off_when_the_config_says_so():
    out, _ = _cli("runtime.huge_pages=false")
    assert out == {"code": 0, "env": None, "huge_pages_active": False, "mmap_threshold": 0}


def test_the_users_environment_wins_and_the_command_notes_it():
    out, err = _cli(THP_MEM_ALLOC_ENABLE="0")
    assert out == {"code": 0, "env": "0", "huge_pages_active": False, "mmap_threshold": 0}
    assert "note: runtime.huge_pages: not in effect" in err
