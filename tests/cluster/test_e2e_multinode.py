"""End to end on a multi-node cluster of real `ray start` processes on this machine.

cluster/local/start-local.sh starts a head on 127.0.0.20 (no CPUs for tasks, so the
shards go to the workers) and two worker raylets on 127.0.0.21 and .22. A driver in
its own process (tests/cluster/_e2e_driver.py) creates a 4-shard table, trains it,
saves a checkpoint, and trains one step more. The test then stops one worker node
alone (`stop-local.sh --node`, the pids start-local.sh recorded for it), and the
driver sees the table roll back to the checkpoint (StoreRolledBack), with the lost
shards restarted on the surviving worker, and trains on. stop-local.sh ends the
cluster and the test checks that no process of it is left.

Where later pieces plug in:
- checkpoints on shared storage: the ``checkpoint_root`` fixture gives the driver its
  root; an ``s3://`` URI of an S3 server started on loopback goes there;
- gRPC: between the "trained" phase and the node loss, start ``memstore serve`` against
  this cluster's RAY_ADDRESS and query the table from a separate process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "cluster" / "local"
HEAD_IP, WORKER_IPS = "127.0.0.20", ["127.0.0.21", "127.0.0.22"]
# A lost raylet is declared dead after 3 missed health checks 0.5 s apart.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def _free_gcs_port() -> int:
    """A free GCS port on the head's address, with the Ray client port (10001) free too:
    another cluster on 127.0.0.20 would make this test disturb it."""
    try:
        with socket.socket() as s, socket.socket() as client:
            s.bind((HEAD_IP, 0))
            client.bind((HEAD_IP, 10001))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"{HEAD_IP} is in use by another cluster: {e}")


def _processes_of(local_dir: str, address: str) -> list[str]:
    """Command lines of running processes that belong to the cluster."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines()
            if not line.lstrip().startswith("Z")
            and (local_dir + "/" in line or f"--address={address} " in line + " ")]


@pytest.fixture
def local_cluster():
    """The environment of a running 3-node cluster; stopped whatever the test does."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() or shutil.which("bash") is None:
        pytest.skip(f"`ray start` unavailable: no ray CLI at {ray_cli} or no bash")
    port = _free_gcs_port()
    local_dir = tempfile.mkdtemp(prefix="rle", dir="/tmp")  # short: unix socket paths
    env = {**os.environ, "RAY": str(ray_cli), "RAY_PORT": str(port), "HEAD_IP": HEAD_IP,
           "HEAD_CPUS": "0", "WORKER_CPUS": "4", "OBJECT_STORE_MB": "100",
           "HEAD_SYSTEM_CONFIG": json.dumps(FAST_HEALTH_CHECKS),
           "RAY_LOCAL_DIR": local_dir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    cluster = {"env": env, "dir": local_dir, "address": f"{HEAD_IP}:{port}"}
    try:
        started = subprocess.run([str(LOCAL / "start-local.sh"), "2"], env=env,
                                 capture_output=True, text=True, timeout=120, check=False)
        assert started.returncode == 0, started.stderr[-3000:]
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in started.stdout.splitlines())
        assert exports["RAY_ADDRESS"] == cluster["address"]
        cluster["driver_env"] = {**env, **exports}
        yield cluster
    finally:  # the test stops it itself; this is for a test that failed before that
        subprocess.run([str(LOCAL / "stop-local.sh")], env=env, capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(local_dir, ignore_errors=True)


@pytest.fixture
def checkpoint_root(tmp_path) -> str:
    return str(tmp_path / "checkpoints")


def _read_phase(driver: subprocess.Popen, phase: str) -> dict:
    line = driver.stdout.readline()
    if not line:
        driver.wait(timeout=30)
        pytest.fail(f"driver exited {driver.returncode} before {phase!r}: "
                    f"{driver.stderr.read()[-3000:]}")
    event = json.loads(line)
    assert event["phase"] == phase, event
    return event


def test_train_lose_a_worker_node_recover_and_shut_down(local_cluster, checkpoint_root):
    env = {**local_cluster["driver_env"], "E2E_CHECKPOINT_ROOT": checkpoint_root}
    driver = subprocess.Popen([sys.executable, "-m", "tests.cluster._e2e_driver"], env=env,
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        trained = _read_phase(driver, "trained")
        assert trained["driver"] == HEAD_IP
        assert trained["grid"] == [4, 1]
        assert trained["shards"] == sorted(WORKER_IPS * 2)  # 2 + 2 on the worker nodes
        assert trained["max_err"] <= 1e-5
        assert Path(trained["checkpoint"]).parent == Path(checkpoint_root)

        lost = WORKER_IPS[1]
        stopped = subprocess.run([str(LOCAL / "stop-local.sh"), "--node", lost],
                                 env=local_cluster["env"], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert stopped.returncode == 0, stopped.stderr
        assert not (Path(local_cluster["dir"]) / f"node-{lost}.pids").exists()
        driver.stdin.write("node-stopped\n")
        driver.stdin.flush()

        recovered = _read_phase(driver, "recovered")
        assert recovered["rolled_back_to"] == 2  # the step of the checkpoint
        assert recovered["restored_diff"] <= 1e-6  # every row as saved, on every shard
        assert recovered["last_step"] == 4
        assert recovered["max_err"] <= 1e-5 and recovered["final_diff"] <= 1e-5
        assert recovered["shards"] == [WORKER_IPS[0]] * 4  # restarted on the survivor
        assert driver.wait(timeout=60) == 0, driver.stderr.read()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    # Shut down: nothing of the cluster may be left running.
    stopped = subprocess.run([str(LOCAL / "stop-local.sh")], env=local_cluster["env"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert _processes_of(local_cluster["dir"], local_cluster["address"]) == []

