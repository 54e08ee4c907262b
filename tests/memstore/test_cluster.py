"""memstore on a multi-node Ray cluster of real raylets.

Two kinds of cluster, both on this machine and on loopback only:

- ``cluster/local/start-local.sh``: real ``ray start`` processes, head and workers each on
  their own 127.0.0.N, joined by a driver in a subprocess (the first test);
- ``ray.cluster_utils.Cluster`` (module fixture): a head with 1 CPU and worker raylets
  with 2 CPUs each, all on 127.0.0.1. Its GCS checks node health every 0.5 s so a
  removed node is declared dead within seconds; ``Cluster.remove_node`` kills a node's
  raylet, object store and every worker process on it, as a lost machine would.

Every table is compared with a local ``memstore.ShardTable`` of the same config (same
seed, so the same initial values), trained on the same batches.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import memstore
from memstore.table import shard_name

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytestmark = pytest.mark.cluster  # real raylets: skipped by the everyday `-m "not cluster"`

REPO = Path(__file__).resolve().parents[2]
ROWS, DIM = 4096, 128
LR = 1e-2
TIMEOUT_S = 30.0
# Node failure detection: a raylet that misses 3 health checks 0.5 s apart is dead.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
WORKER_NODES = 3


# ---- helpers ---------------------------------------------------------------------------
def _batch(step: int, batch: int = 16, slots: int = 8):
    """The batch of a step: the same idx, w and dy for the table and the local reference."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, ROWS, (batch, slots), generator=g)
    w = torch.softmax(torch.randn(batch, slots, generator=g), dim=-1)
    dy = torch.randn(batch, DIM, generator=g)
    return idx, w, dy


def _local(seed: int) -> memstore.ShardTable:
    return memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=LR), seed=seed)


def _train(table, local, step: int) -> None:
    """One step on both: lookup, backward, optimizer step, with equal results."""
    idx, w, dy = _batch(step)
    torch.testing.assert_close(table.lookup(idx, w), local.lookup(idx, w), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        table.backward(idx, w, dy, step=step),
        local.backward(idx, w, dy, step=step),
        atol=1e-6,
        rtol=1e-6,
    )
    assert table.step(step) == local.step(step)


def _assert_same_values(table, local) -> None:
    every_row = torch.arange(ROWS)
    torch.testing.assert_close(
        table.gather(every_row), local.gather(every_row).float(), atol=1e-6, rtol=0
    )
    idx, w, _ = _batch(10_000, batch=64)
    torch.testing.assert_close(table.lookup(idx, w), local.lookup(idx, w), atol=1e-6, rtol=0)


def _actor_nodes() -> dict[str, str]:
    """Live actor name -> node id, from the GCS (no dashboard needed)."""
    import ray

    return {
        a["Name"]: a["Address"]["NodeID"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a["Name"]
    }


def _catalog_node(table) -> str:
    """The node of the table's catalog actor, once it is up (create_table does not wait
    for it)."""
    import ray

    ray.get(table._catalog().get_config.remote(), timeout=TIMEOUT_S)
    return _actor_nodes()[f"{table.name}/catalog"]


def _ensure_workers(cluster, count: int = WORKER_NODES) -> None:
    """Tests that remove nodes first bring the cluster back to ``count`` workers."""
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()


def _removable_shard(cluster, table) -> tuple[tuple[int, int], object]:
    """A shard on a worker node (the driver's head node cannot go) whose node does not also
    host the table's catalog (see test_catalog_survives_the_loss_of_its_node)."""
    info = table._call_all("info")
    catalog_node = _catalog_node(table)
    workers = {n.node_id: n for n in cluster.worker_nodes}
    for block in sorted(info):
        node_id = info[block]["node_id"]
        if node_id in workers and node_id != catalog_node:
            return block, workers[node_id]
    pytest.fail(f"no shard on a removable worker node: {info}, catalog on {catalog_node}")


# ---- cluster/local/start-local.sh: real `ray start` raylets on 127.0.0.N ---------------------
DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray, torch, memstore
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    t = memstore.create_table("start-local", rows=4096, dim=128, shards=2, timeout_s=60)
    try:
        info = t._call_all("info")
        g = torch.Generator().manual_seed(3)
        idx, w = torch.randint(0, 4096, (8, 4), generator=g), torch.rand(8, 4, generator=g)
        err = (t.lookup(idx, w) - memstore.ShardTable(4096, 128).lookup(idx, w)).abs().max()
        print(json.dumps({"nodes": sorted(ips.values()), "grid": list(t.grid.shape),
                          "shards": sorted(ips[i["node_id"]] for i in info.values()),
                          "driver": ray.util.get_node_ip_address(), "err": float(err)}))
    finally:
        memstore.drop_table("start-local")
""")


def _free_head() -> tuple[str, int]:
    """A head address 127.0.0.N (N + 1 free for the worker) whose GCS port and Ray
    client port (10001) are free, so that a concurrent cluster is never disturbed."""
    for n in range(40, 240, 7):
        ip = f"127.0.0.{n}"
        try:
            with socket.socket() as s, socket.socket() as c:
                s.bind((ip, 0))
                c.bind((ip, 10001))
                return ip, s.getsockname()[1]
        except OSError:
            continue
    pytest.skip("no free loopback address for a local cluster")


@pytest.mark.timeout(150)
def test_start_local_script_runs_a_two_raylet_cluster():
    """start-local.sh starts a head and a worker raylet (real `ray start`), a driver in
    another process joins through RAY_ADDRESS, its 2 shards land on the two raylets, and
    stop-local.sh stops exactly that cluster."""
    ray_cli = Path(sys.executable).with_name("ray")
    if os.environ.get("MEMSTORE_SKIP_RAY_START") == "1":
        pytest.skip("MEMSTORE_SKIP_RAY_START=1")
    if not ray_cli.exists() or shutil.which("bash") is None:
        pytest.skip(f"`ray start` unavailable: no ray CLI at {ray_cli} or no bash")
    head_ip, port = _free_head()
    worker_ip = head_ip.rsplit(".", 1)[0] + "." + str(int(head_ip.rsplit(".", 1)[1]) + 1)
    local_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: unix socket paths
    env = {
        **os.environ,
        "RAY": str(ray_cli),
        "RAY_PORT": str(port),
        "HEAD_IP": head_ip,
        "HEAD_CPUS": "1",
        "WORKER_CPUS": "1",
        "OBJECT_STORE_MB": "100",
        "RAY_LOCAL_DIR": local_dir,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    try:
        started = subprocess.run(
            [str(REPO / "cluster/local/start-local.sh"), "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
        )
        assert exports["RAY_ADDRESS"] == f"{head_ip}:{port}"
        assert exports["RAY_AUTH_MODE"] == "token"
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER],
            env={**env, **exports},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert driver.returncode == 0, driver.stderr[-3000:]
        out = json.loads(driver.stdout.strip().splitlines()[-1])
        assert out["nodes"] == [head_ip, worker_ip]
        assert out["driver"] == head_ip
        assert out["grid"] == [1, 2]
        assert out["shards"] == [head_ip, worker_ip]  # one shard on each raylet
        assert out["err"] <= 1e-6
    finally:
        stopped = subprocess.run(
            [str(REPO / "cluster/local/stop-local.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        left = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
        shutil.rmtree(local_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert [
        line
        for line in left.splitlines()
        if local_dir + "/" in line or f"--address={head_ip}:{port} " in line
    ] == []


# ---- ray.cluster_utils.Cluster ---------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    # Cluster records its address as the machine's "current cluster"; forget it, so that
    # a plain ray.init() elsewhere on this machine never joins this test cluster.
    reset_ray_address()
    try:
        _ensure_workers(c)
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_shards_spread_over_nodes_and_match_a_local_table(cluster, table_names):
    name = table_names("spread")
    t = memstore.create_table(
        name,
        rows=ROWS,
        dim=DIM,
        shards=3,
        seed=7,
        optimizer=memstore.Adam(lr=LR),
        timeout_s=TIMEOUT_S,
    )
    assert t.grid.shape == (3, 1)
    info = t._call_all("info")
    nodes = [i["node_id"] for i in info.values()]
    assert len(set(nodes)) == 3, f"SPREAD placed two shards on one node: {info}"
    alive = {n.node_id for n in cluster.list_all_nodes()}
    assert set(nodes) <= alive

    local = _local(seed=7)
    _assert_same_values(t, local)  # same seed, same initial values on any grid
    for step in (1, 2, 3):
        _train(t, local, step)
    _assert_same_values(t, local)

    # Another handle on the same table (as another job would get) sees the same state.
    other = memstore.connect(name, timeout_s=TIMEOUT_S)
    assert other.last_step == 3
    _assert_same_values(other, local)


def _lose_a_shard_node(cluster, table_names, tmp_path, prefix):
    """A table trained 3 steps, saved at step 2, and one of its shards' nodes gone."""
    _ensure_workers(cluster)
    name = table_names(prefix)
    t = memstore.create_table(
        name,
        rows=ROWS,
        dim=DIM,
        shards=3,
        seed=11,
        optimizer=memstore.Adam(lr=LR),
        checkpoint_root=str(tmp_path),
        max_restarts=2,
        timeout_s=TIMEOUT_S,
    )
    local = _local(seed=11)
    for step in (1, 2):
        _train(t, local, step)
    saved = _local(seed=11)
    saved.load_state_dict(local.state_dict())
    assert Path(t.save()).parent == tmp_path
    _train(t, local, 3)

    block, node = _removable_shard(cluster, t)
    before = t._call_all("info")
    cluster.remove_node(node)
    return t, saved, block, node, before


def test_losing_a_shard_node_rolls_the_table_back_to_the_checkpoint(cluster, table_names, tmp_path):
    """The shard restarts on another node, reloads step 2, and the handle rolls the other
    shards back: StoreRolledBack(2), then the values of step 2, then training goes on.

    The first call after the loss reaches the dead worker, or the shard while it
    restarts (Ray answers ActorUnavailableError, "The actor is restarting"); either way
    the handle waits for the restart within its own timeout and raises StoreRolledBack,
    never ShardUnavailable (which it would raise at that timeout), and never serves a mix
    of step 2 and step 3."""
    t, saved, block, node, before = _lose_a_shard_node(cluster, table_names, tmp_path, "rollback")
    idx, w, _ = _batch(4)
    with pytest.raises(memstore.StoreRolledBack) as err:
        t.lookup(idx, w)
    rolled = err.value
    assert rolled.step == 2
    assert rolled.shard == shard_name(t.name, *block)
    assert t.last_step == 2

    after = t._call_all("info")
    assert after[block]["node_id"] != node.node_id  # restarted on a surviving node
    assert after[block]["incarnation"] != before[block]["incarnation"]
    assert after[block]["restored_step"] == 2
    assert {i["last_step"] for i in after.values()} == {2}
    live = {n.node_id for n in cluster.list_all_nodes()}
    assert {i["node_id"] for i in after.values()} <= live

    _assert_same_values(t, saved)  # exactly the state of step 2, on every shard
    for step in (3, 4):  # the trainer restores step 2 and goes on
        _train(t, saved, step)
    _assert_same_values(t, saved)


def test_losing_a_shard_node_without_restarts_raises_shard_unavailable(cluster, table_names):
    _ensure_workers(cluster)
    name = table_names("no-restart")
    t = memstore.create_table(
        name, rows=ROWS, dim=DIM, shards=3, max_restarts=0, timeout_s=TIMEOUT_S
    )
    local = _local(seed=0)
    _train(t, local, 1)
    block, node = _removable_shard(cluster, t)
    cluster.remove_node(node)

    idx, w, dy = _batch(2)
    # Each call answers with the error that names the lost shard (its own timeout bounds
    # the wait), never a result made without that shard.
    for call in (
        lambda: t.lookup(idx, w),
        lambda: t.backward(idx, w, dy, step=2),
        lambda: t.step(2),
        lambda: t.gather(torch.arange(ROWS)),
    ):
        with pytest.raises(memstore.ShardUnavailable) as err:
            call()
        assert err.value.shard == shard_name(name, *block)
        assert name in str(err.value)
    # The table can still be dropped (no shard is called) and its name reused.
    memstore.drop_table(name)
    with pytest.raises(memstore.TableNotFound):
        memstore.connect(name)


def test_catalog_survives_the_loss_of_its_node(cluster, table_names):
    import ray

    _ensure_workers(cluster)
    name = table_names("catalog")
    t = memstore.create_table(name, rows=ROWS, dim=DIM, shards=2, timeout_s=TIMEOUT_S)
    catalog_node = _catalog_node(t)
    node = next((n for n in cluster.worker_nodes if n.node_id == catalog_node), None)
    try:
        print("catalog on", "a worker node: removing it" if node else "the head: killing it")
        if node is not None:
            cluster.remove_node(node)
        else:  # on the driver's head node, which cannot go: lose the process instead
            ray.kill(t._catalog(), no_restart=False)
        # The catalog restarts (elsewhere when its node is gone); connect waits for it.
        # When the node also held a shard, the first connect reports that shard's
        # restart as a rollback (it brought the other shards to the same state).
        try:
            again = memstore.connect(name, timeout_s=TIMEOUT_S)
        except memstore.StoreRolledBack:
            again = memstore.connect(name, timeout_s=TIMEOUT_S)
        assert again.grid.shape == t.grid.shape
    finally:
        _force_drop(name, t)


def _force_drop(name: str, table) -> None:
    """drop_table without the catalog: kill the shards by handle and free the group."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    try:
        memstore.drop_table(name)
        return
    except memstore.TableNotFound:
        pass
    for actor in table.shards.values():
        ray.kill(actor, no_restart=True)
    try:
        remove_placement_group(get_placement_group(f"memstore/{name}"))
    except ValueError:
        pass
