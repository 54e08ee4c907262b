"""End to end on a multi-node cluster of real `ray start` processes on this machine.

An S3 server (moto_server) runs on 127.0.0.1 with a bucket for the checkpoints, and
cluster/local/start-local.sh starts a head on 127.0.0.20 (no CPUs for tasks, so the
shards go to the workers) and two worker raylets on 127.0.0.21 and .22, every node
with the S3 credentials in its environment. Then, in order:

1. Train. A driver in its own process (tests/cluster/_e2e_driver.py) creates the memory
   table of the facts model (memstore/trainer/model.py, a tiny facts-small-memory) on 4 shards,
   which land 2 + 2 on the workers, and trains the model with a plain loop (AdamW on
   the dense weights, the table's own Adam on the values) against the same model on a
   local table. It checkpoints the table to s3:// after step 2 and trains step 3.
   The test finds the checkpoint's manifest in the bucket.
2. Serve. `memstore serve` (its own process, a driver of the cluster) binds 127.0.0.1
   with a read-only token; `memstore query` (another process, no Ray) sends the
   model's queries over the published keys and gets the indices, scores and values
   the driver got through its Ray handle; a gather over gRPC returns its value rows.
3. Lose a node. `stop-local.sh --node` stops one worker alone (the pids start-local.sh
   recorded for it). The driver's next step raises StoreRolledBack to the checkpoint's
   step; the lost shards restart on the surviving worker and reload the checkpoint
   from S3 (every value as saved); the driver restores its dense state of that step
   and trains steps 3 and 4 again, equal to the reference. The server, still running,
   serves the recovered values.
4. Shut down. The driver drops the table and exits, the server stops on SIGTERM,
   stop-local.sh ends the cluster and the S3 server is stopped; no process of any of
   them is left.

A second test starts a head alone (start-local.sh, with its dashboard on the head's
loopback address) and knocks on Ray's doors: a driver without the token and one with a
wrong token are refused by the GCS, a driver with the token joins; the job API answers a
POST without the token with 401 and one with a wrong token with 403, and no job was
submitted; the dashboard is bound to the head's address, not every interface.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.s3_server import CREDENTIALS as S3_CREDENTIALS
from tests.s3_server import moto_s3

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "cluster" / "local"
HEAD_IP, WORKER_IPS = "127.0.0.20", ["127.0.0.21", "127.0.0.22"]
# A lost raylet is declared dead after 3 missed health checks 0.5 s apart.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
TABLE = "e2e-facts"  # the driver's table
BUCKET, PREFIX = "memstore-e2e", "facts-memory"
RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
SERVER_THREADS = 2  # each thread of `memstore serve` keeps its own table handle
# The store's model and the local reference agree up to float summation order (the row
# blocks' partial sums against one block's), and Adam scales each coordinate by its own
# gradient history, so a gradient that nearly cancels carries its rounding into a visible
# fraction of its step: 8.6e-6 apart after 3 steps and 1.5e-5 after 4, the same in every
# run. A lost, doubled or misrouted update moves values by about lr (1e-3) or value_lr
# (3e-2), far beyond this bound.
MAX_VALUE_DIFF = 1e-4

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


def _processes_of(markers: list[str]) -> list[str]:
    """Command lines of running processes that contain any of the markers."""
    out = subprocess.run(
        ["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    return [
        line
        for line in out.splitlines()
        if not line.lstrip().startswith("Z") and any(m in line + " " for m in markers)
    ]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def s3():
    """A moto S3 server on loopback with the checkpoint bucket."""
    with moto_s3(BUCKET) as server:
        yield server


@pytest.fixture
def local_cluster(s3):
    """The environment of a running 3-node cluster; stopped whatever the test does."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() or shutil.which("bash") is None:
        pytest.skip(f"`ray start` unavailable: no ray CLI at {ray_cli} or no bash")
    port = _free_gcs_port()
    local_dir = tempfile.mkdtemp(prefix="rle", dir="/tmp")  # short: unix socket paths
    # The nodes get the S3 credentials as a cloud machine would: shards on any node
    # write and (restarted) read the checkpoints.
    env = {
        **os.environ,
        **S3_CREDENTIALS,
        "RAY": str(ray_cli),
        "RAY_PORT": str(port),
        "HEAD_IP": HEAD_IP,
        "HEAD_CPUS": "0",
        "WORKER_CPUS": "4",
        "OBJECT_STORE_MB": "100",
        "HEAD_SYSTEM_CONFIG": json.dumps(FAST_HEALTH_CHECKS),
        "RAY_LOCAL_DIR": local_dir,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for var in RAY_VARS:
        env.pop(var, None)
    cluster = {"env": env, "dir": local_dir, "address": f"{HEAD_IP}:{port}"}
    try:
        started = subprocess.run(
            [str(LOCAL / "start-local.sh"), "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
        )
        assert exports["RAY_ADDRESS"] == cluster["address"]
        cluster["driver_env"] = {**env, **exports}
        yield cluster
    finally:  # the test stops it itself; this is for a test that failed before that
        stopped = subprocess.run(
            [str(LOCAL / "stop-local.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        left = _processes_of([local_dir + "/", f"--address={cluster['address']} "])
        for marker in (local_dir + "/", f"--address={cluster['address']} "):
            subprocess.run(["pkill", "-9", "-f", "--", marker], check=False)
        shutil.rmtree(local_dir, ignore_errors=True)
        # A process stop-local.sh missed is a failure even after the test failed.
        assert not left, f"stop-local.sh left {left}: {stopped.stderr[-2000:]}"


@pytest.fixture
def grpc_token(tmp_path) -> tuple[str, Path]:
    """A read-only token and the server's token file holding it (mode 0600)."""
    token = secrets.token_urlsafe(24)
    path = tmp_path / "grpc-tokens"
    path.write_text(f"{token} read\n")
    path.chmod(0o600)
    return token, path


def _read_phase(driver: subprocess.Popen, phase: str, stderr: Path) -> dict:
    line = driver.stdout.readline()
    if not line:
        driver.wait(timeout=30)
        pytest.fail(
            f"driver exited {driver.returncode} before {phase!r}: {stderr.read_text()[-3000:]}"
        )
    event = json.loads(line)
    assert event["phase"] == phase, event
    return event


def _tell(driver: subprocess.Popen, command: str) -> None:
    driver.stdin.write(command + "\n")
    driver.stdin.flush()


def _serve(env: dict, token_file: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`memstore serve` on a free port of 127.0.0.1, a driver of the cluster."""
    with log.open("w") as err:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memstore.cli",
                "serve",
                "--address",
                "127.0.0.1:0",
                "--ray-address",
                env["RAY_ADDRESS"],
                "--token-file",
                str(token_file),
                "--threads",
                str(SERVER_THREADS),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    line = server.stdout.readline()
    assert "serving on 127.0.0.1:" in line, log.read_text()[-3000:]
    return server, line.split("serving on ")[1].split(";")[0]


def _query_cli(address: str, token_file: Path, work: Path, k: int) -> dict:
    """`memstore query` in its own process, without Ray: indices, scores and values."""
    env = {key: value for key, value in os.environ.items() if key not in RAY_VARS}
    out = work / "grpc-query.npz"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memstore.cli",
            "query",
            "--table",
            TABLE,
            "--vectors",
            str(work / "q.npy"),
            "-k",
            str(k),
            "--out",
            str(out),
            "--address",
            address,
            "--token-file",
            str(token_file),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out, allow_pickle=False) as answer:
        return dict(answer)


def test_train_serve_lose_a_worker_node_recover_and_shut_down(
    local_cluster, s3, grpc_token, tmp_path
):
    from memstore.client import MemoryClient

    work = tmp_path / "work"
    work.mkdir()
    env = {
        **local_cluster["driver_env"],
        "E2E_CHECKPOINT_ROOT": s3.uri(PREFIX),
        "E2E_WORK_DIR": str(work),
    }
    driver_log = tmp_path / "driver.log"
    with driver_log.open("w") as err:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster._e2e_driver"],
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    server = None
    token, token_file = grpc_token
    try:
        # 1. trained on 4 shards, 2 + 2 on the workers, checkpointed to S3
        trained = _read_phase(driver, "trained", driver_log)
        assert trained["driver"] == HEAD_IP
        assert trained["grid"] == [4, 1]
        assert trained["shards"] == sorted(WORKER_IPS * 2)
        assert trained["last_step"] == 3
        assert trained["loss_diff"] <= 1e-5 and trained["max_diff"] <= MAX_VALUE_DIFF
        assert trained["same_topk"]  # the store's query = the model's own top-k
        checkpoint = f"s3://{BUCKET}/{PREFIX}/step-000000002"
        assert trained["checkpoint"].split("?")[0] == checkpoint
        manifest = json.loads(
            s3.fs.open_input_stream(f"{BUCKET}/{PREFIX}/step-000000002/manifest.json").readall()
        )
        assert manifest["step"] == 2 and len(manifest["blocks"]) == 4

        # 2. served over gRPC: a query and a gather from other processes
        server, address = _serve(local_cluster["driver_env"], token_file, tmp_path / "serve.log")
        answer = _query_cli(address, token_file, work, k=4)
        np.testing.assert_array_equal(answer["indices"], np.load(work / "indices.npy"))
        np.testing.assert_allclose(
            answer["scores"], np.load(work / "scores.npy"), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            answer["values"], np.load(work / "values.npy"), rtol=1e-6, atol=1e-6
        )
        rows = np.load(work / "rows-trained.npy")
        with MemoryClient(address, token=token, read_retries=0) as client:
            np.testing.assert_array_equal(client.gather(TABLE, np.arange(len(rows))), rows)

        # 3. a worker node lost: rolled back to the S3 checkpoint, trained on
        lost = WORKER_IPS[1]
        stopped = subprocess.run(
            [str(LOCAL / "stop-local.sh"), "--node", lost],
            env=local_cluster["env"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert stopped.returncode == 0, stopped.stderr
        assert not (Path(local_cluster["dir"]) / f"node-{lost}.pids").exists()
        _tell(driver, "node-stopped")
        recovered = _read_phase(driver, "recovered", driver_log)
        assert recovered["rolled_back_to"] == 2  # the step of the checkpoint
        assert recovered["restored_diff"] == 0  # every row as saved, on every shard
        assert recovered["last_step"] == 4
        assert recovered["loss_diff"] <= 1e-5 and recovered["max_diff"] <= MAX_VALUE_DIFF
        assert recovered["shards"] == [WORKER_IPS[0]] * 4  # restarted on the survivor
        with MemoryClient(address, token=token, read_retries=0) as client:
            np.testing.assert_array_equal(
                client.gather(TABLE, np.arange(len(rows))), np.load(work / "rows-recovered.npy")
            )
        _tell(driver, "done")
        assert driver.wait(timeout=60) == 0, driver_log.read_text()[-3000:]

        # 4. shut down: the server, the cluster, the S3 server
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for process in (driver, server):
            if process is not None:
                _stop(process)

    stopped = subprocess.run(
        [str(LOCAL / "stop-local.sh")],
        env=local_cluster["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert stopped.returncode == 0, stopped.stderr
    s3.process.terminate()
    s3.process.wait(timeout=30)
    # Nothing of the cluster, the server or the S3 server may be left running (the
    # driver was waited for above).
    assert (
        _processes_of(
            [
                local_cluster["dir"] + "/",
                f"--address={local_cluster['address']} ",
                str(token_file),
                s3.command + " ",
            ]
        )
        == []
    )


# ---- Ray's token authentication on a real head ----------------------------------------------
AUTH_HEAD_IP = "127.0.0.24"
# The GCS's answer to a caller without the right token (Ray's gcs_client log line).
GCS_REFUSAL = "Authentication token is missing or incorrect"
JOIN = (
    "import ray, sys\n"
    "ray.init(address=sys.argv[1], log_to_driver=False)\n"
    "print('joined', ray.cluster_resources()['CPU'])\n"
)


def _free_ports(ip: str, count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((ip, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _http(method: str, url: str, token: str | None, body: dict | None = None) -> tuple:
    """(status, body) of one request to the dashboard; None while it is not listening."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (ConnectionError, urllib.error.URLError):
        return None, ""


def _dashboard_answers(url: str) -> None:
    """Wait until the dashboard answers at all (it starts after `ray start` returns)."""
    for _ in range(120):
        status, _ = _http("GET", url + "/api/gcs_healthz", None)
        if status is not None:
            return
        subprocess.run(["sleep", "0.5"], check=True)
    pytest.fail(f"the dashboard at {url} never answered")


@pytest.fixture
def auth_head(tmp_path):
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() or shutil.which("bash") is None:
        pytest.skip(f"`ray start` unavailable: no ray CLI at {ray_cli} or no bash")
    try:
        with socket.socket() as client:
            client.bind((AUTH_HEAD_IP, 10001))
    except OSError as e:
        pytest.skip(f"{AUTH_HEAD_IP} is in use by another cluster: {e}")
    gcs_port, dashboard_port = _free_ports(AUTH_HEAD_IP, 2)
    local_dir = tempfile.mkdtemp(prefix="rla", dir="/tmp")
    env = {
        **os.environ,
        "RAY": str(ray_cli),
        "RAY_PORT": str(gcs_port),
        "HEAD_IP": AUTH_HEAD_IP,
        "HEAD_CPUS": "1",
        "OBJECT_STORE_MB": "100",
        "DASHBOARD_PORT": str(dashboard_port),
        "RAY_LOCAL_DIR": local_dir,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for var in (*RAY_VARS, "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    try:
        started = subprocess.run(
            [str(LOCAL / "start-local.sh"), "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
        )
        yield {
            "env": env,
            "exports": exports,
            "dir": local_dir,
            "address": f"{AUTH_HEAD_IP}:{gcs_port}",
            "dashboard_port": dashboard_port,
            "home": tmp_path / "home",  # no ~/.ray/auth_token in it
        }
    finally:
        subprocess.run(
            [str(LOCAL / "stop-local.sh")], env=env, capture_output=True, timeout=60, check=False
        )
        left = _processes_of([local_dir + "/"])
        shutil.rmtree(local_dir, ignore_errors=True)
        assert not left, f"stop-local.sh left {left}"


def test_token_auth_refuses_drivers_and_job_submissions_without_the_token(auth_head):
    exports, address = auth_head["exports"], auth_head["address"]
    token_path = Path(exports["RAY_AUTH_TOKEN_PATH"])
    assert exports["RAY_AUTH_MODE"] == "token"
    assert token_path.parent == Path(auth_head["dir"])
    info = token_path.stat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o600
    assert Path(auth_head["dir"]).stat().st_mode & 0o777 == 0o700
    token = token_path.read_text()
    wrong = secrets.token_hex(32)

    auth_head["home"].mkdir()
    base = {k: v for k, v in auth_head["env"].items() if k not in RAY_VARS}
    base["HOME"] = str(auth_head["home"])
    # A driver retries a refused GCS for this long before ray.init raises (tests/conftest.py
    # raises it to 120 s for a GCS that starts slowly; this one is already up).
    base["RAY_gcs_server_port_wait_time_s"] = "10"
    drivers = {
        "no token": base,
        "wrong token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": wrong},
        "the token": {**base, **exports},
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", JOIN, address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in drivers.items()
    }
    done = {name: (p.communicate(timeout=120), p.returncode) for name, p in running.items()}
    for name in ("no token", "wrong token"):
        (out, err), code = done[name]
        assert code != 0 and "joined" not in out, (name, out)
        assert GCS_REFUSAL in err, (name, err[-2000:])
    (out, err), code = done["the token"]
    assert code == 0 and out.strip() == "joined 1.0", err[-2000:]

    url = f"http://{AUTH_HEAD_IP}:{auth_head['dashboard_port']}"
    _dashboard_answers(url)
    job = {"entrypoint": "echo submitted-without-the-token"}
    assert _http("POST", url + "/api/jobs/", None, job)[0] == 401
    assert _http("POST", url + "/api/jobs/", wrong, job)[0] == 403
    status, listed = _http("GET", url + "/api/jobs/", token)
    assert status == 200
    jobs = json.loads(listed)
    # The driver that joined with the token, and no submitted job.
    assert [j["type"] for j in jobs] == ["DRIVER"], jobs
    # Bound to the head's address only: the same port is free on 127.0.0.1.
    with socket.socket() as s:
        s.bind(("127.0.0.1", auth_head["dashboard_port"]))
