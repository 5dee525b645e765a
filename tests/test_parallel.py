"""rlmt.parallel: the shard rules (pure), a world of one, and two gloo processes on this machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from rlmt.parallel import World, check_divisible, config_digest, init_world, shard_groups, shard_rows
from rlmt.parallel.shard import ShardError

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shards_partition_the_global_batch_in_order(world_size):
    batch = list(range(12))
    parts = [shard_rows(batch, r, world_size) for r in range(world_size)]
    assert [x for p in parts for x in p] == batch and len({len(p) for p in parts}) == 1
    groups = [list(shard_groups(8, r, world_size)) for r in range(world_size)]
    assert [g for p in groups for g in p] == list(range(8))


def test_batches_that_do_not_divide_name_the_key():
    with pytest.raises(ShardError, match=r"data.batch_size=6 does not divide across 4 processes"):
        check_divisible(6, 4, "data.batch_size")
    with pytest.raises(ShardError, match="rollout.prompts_per_step=3"):
        shard_groups(3, 0, 2)
    with pytest.raises(ValueError, match="rank 2"):
        shard_rows([1, 2], 2, 2)


def test_config_digest_ignores_key_order_and_sees_values():
    assert config_digest({"a": 1, "b": {"c": 2}}) == config_digest({"b": {"c": 2}, "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 1.5})


def test_a_world_of_one_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = init_world()
    assert world == World() and world.is_main
    import torch
    t = torch.tensor([1.0, 2.0])
    assert world.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert world.broadcast_object({"x": 1}) == {"x": 1} and world.all_gather_object(3) == [3]
    assert world.all_reduce_max(2.5) == 2.5


WORKER = r'''
import json, os, sys
import torch
from rlmt.parallel import check_same_config, init_world
from rlmt.parallel.consistency import ConfigMismatch
from rlmt.parallel.world import close_world
world = init_world(timeout_s=60)
out = {"rank": world.rank, "size": world.size, "backend": world.backend}
t = torch.tensor([float(world.rank + 1), 10.0 * (world.rank + 1)])
out["sum"] = world.all_reduce_sum(t).tolist()
out["max"] = world.all_reduce_max(world.rank)
out["bcast"] = world.broadcast_object({"from": world.rank})
out["gather"] = world.all_gather_object(world.rank * 2)
cfg = {"optim": {"lr": 1e-5}, "run": {"seed": 0}}
check_same_config(world, cfg)
if sys.argv[1] == "mismatch" and world.rank == 1:
    cfg = {"optim": {"lr": 2e-5}, "run": {"seed": 0}}
try:
    check_same_config(world, cfg)
    out["check"] = "same"
except ConfigMismatch as e:
    out["check"] = str(e)
from rlmt.train.metrics import MetricReduction
red = MetricReduction()
micro = [({"loss": 0.25, "kl": 1.0, "ratio_max": 1.5, "ratio_min": 0.9}, 3.0),
         ({"loss": 0.5, "kl": 2.0, "ratio_max": 1.2, "ratio_min": 0.7, "only_one_rank": 4.0}, 1.0),
         ({"loss": 0.125, "kl": 4.0, "ratio_max": 2.5, "ratio_min": 0.8}, 2.0),
         ({"loss": 0.0625, "kl": 8.0, "ratio_max": 1.1, "ratio_min": 0.95}, 2.0)]
for step in range(2):  # rank r holds micro-batches r and r + 2 of each step (a different split per rank)
    for m, w in micro[world.rank::2]:
        red.add({k: v * (step + 1) for k, v in m.items() if k != "only_one_rank" or world.rank == 1}, w)
    red.end_step()
out["metrics"] = red.result_across(world)
close_world(world)
print(json.dumps(out))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(mode: str) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": SRC, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(outs, key=lambda o: o["rank"])


def test_two_gloo_ranks_reduce_broadcast_and_agree_on_the_config():
    outs = _two_ranks("same")
    for o in outs:
        assert o["size"] == 2 and o["backend"] == "gloo"
        assert o["sum"] == [3.0, 30.0] and o["max"] == 1.0
        assert o["bcast"] == {"from": 0} and o["gather"] == [0, 2]
        assert o["check"] == "same"


def test_metrics_reduced_across_ranks_equal_the_one_process_reduction():
    from rlmt.train.metrics import MetricReduction
    single = MetricReduction()
    micro = [({"loss": 0.25, "kl": 1.0, "ratio_max": 1.5, "ratio_min": 0.9}, 3.0),
             ({"loss": 0.5, "kl": 2.0, "ratio_max": 1.2, "ratio_min": 0.7, "only_one_rank": 4.0}, 1.0),
             ({"loss": 0.125, "kl": 4.0, "ratio_max": 2.5, "ratio_min": 0.8}, 2.0),
             ({"loss": 0.0625, "kl": 8.0, "ratio_max": 1.1, "ratio_min": 0.95}, 2.0)]
    for step in range(2):
        for m, w in micro:
            single.add({k: v * (step + 1) for k, v in m.items()}, w)
        single.end_step()
    expected = single.result()
    # by hand: kl weighted by 3, 1, 2, 2 -> (3 + 2 + 8 + 16) / 8 = 29/8 at step 1, doubled at step 2
    assert expected["kl"] == pytest.approx(29 / 8 * 1.5) and expected["loss"] == pytest.approx(0.9375 * 1.5)
    assert expected["ratio_max"] == 5.0 and expected["ratio_min"] == 0.7
    for out in _two_ranks("same"):
        assert out["metrics"].keys() == expected.keys()
        for k, v in expected.items():
            assert out["metrics"][k] == pytest.approx(v, rel=1e-12), k


def test_a_rank_with_a_different_config_stops_every_rank():
    rank0, rank1 = _two_ranks("mismatch")
    assert "rank 1 resolved a different config than rank 0: optim.lr=2e-05 (rank 0: 1e-05)" in rank1["check"]
    assert "another rank resolved a different config" in rank0["check"]
