"""The memstore command line: gRPC commands against a real server, Ray commands as a
driver of the test's Ray instance, errors as one line with exit status 1.

`tables`, `describe`, `stats`, `query` (its top-k against the brute-force reference of
kernels.reference), create / save / load / drop, `serve` detached and in the foreground,
`--help` listing every command, and the example client.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pytest
import torch

import memstore
import memstore.server as ms
from memstore.cli import main
from memstore.client import MemoryClient
from memstore.kernels.reference import product_key_topk_reference

from .grpc_util import ADMIN, TOKENS

N, DIM = 8, 4
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_env(ray_start_16_cpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    token_file = tmp / "tokens"
    token_file.write_text(f"{ADMIN} read,write,admin\n")
    token_file.chmod(0o600)
    table = memstore.create_table("cli-t", N * N, DIM, shards=2, seed=2)
    keys = torch.randn(2, 2, N, 3, generator=torch.Generator().manual_seed(0))
    table.publish_keys(keys)
    server = ms.start(ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS))
    yield {
        "tmp": tmp,
        "token_file": str(token_file),
        "address": server.address,
        "keys": keys,
        "ray_address": ray_start_16_cpus.get_runtime_context().gcs_address,
    }
    server.stop()
    memstore.drop_table("cli-t")


def run(env, capsys, *args) -> tuple[int, str, str]:
    rc = main([*args, "--address", env["address"], "--token-file", env["token_file"]])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tables_describe_stats(cli_env, capsys, tmp_path):
    rc, out, _ = run(cli_env, capsys, "tables")
    assert rc == 0 and re.search(r"^cli-t\s+64\s+4\s+0$", out, re.M)
    rc, out, _ = run(cli_env, capsys, "describe", "cli-t")
    assert rc == 0 and "64 rows x 4 float32, grid 2 x 1" in out and "keys published" in out
    assert re.search(r"^0-0\s+32\s+4\s", out, re.M) and re.search(r"^1-0\s+32\s+4\s", out, re.M)
    rc, out, _ = run(cli_env, capsys, "stats", "cli-t", "--plot", str(tmp_path / "s.png"))
    assert rc == 0 and (tmp_path / "s.png").stat().st_size > 1000


def test_stats_plot_draws_the_access_histogram_of_the_row_statistics(
    cli_env, capsys, tmp_path, table_names, monkeypatch
):
    name = table_names("cli-rows")
    table = memstore.create_table(name, 64, DIM, shards=2, seed=3, cpus_per_shard=0.25)
    table.snapshot_stats("empty")
    g = torch.Generator().manual_seed(4)
    read = set()
    for step in (1, 2, 3):
        idx = torch.randint(0, 40, (5, 3), generator=g)
        read |= set(idx.flatten().tolist())
        table.backward(idx, torch.ones(5, 3), torch.randn(5, DIM, generator=g), step=step)
        table.step(step)
    counted, empty = tmp_path / "counted.png", tmp_path / "empty.png"
    drawn = []
    save = matplotlib.figure.Figure.savefig

    def keep_and_save(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_and_save)
    rc, out, _ = run(cli_env, capsys, "stats", name, "--plot", str(counted))
    assert rc == 0 and f"{len(read)} of 64 rows read in 3 counted steps" in out
    # The access panel: each read row's df, most used first, on log axes.
    access = drawn[-1].axes[2]
    df = table.row_stats()["df"]
    np.testing.assert_array_equal(access.lines[0].get_ydata(), np.sort(df[df > 0])[::-1])
    assert access.get_xscale() == access.get_yscale() == "log"
    rc, out, _ = run(cli_env, capsys, "stats", name, "--plot", str(empty), "--background", "empty")
    assert rc == 0 and "0 of 64 rows read in 0 counted steps" in out
    assert counted.read_bytes() != empty.read_bytes()
    rc, _, err = run(cli_env, capsys, "stats", name, "--plot", str(empty), "--background", "x")
    assert rc == 1 and "background" in err and len(err.strip().splitlines()) == 1


def test_query_prints_and_writes_the_reference_top_k(cli_env, capsys, tmp_path):
    q = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "q.npy", q.numpy())
    scores, indices = product_key_topk_reference(q.double(), cli_env["keys"].double(), 3)
    rc, out, _ = run(
        cli_env,
        capsys,
        "query",
        "--table",
        "cli-t",
        "--vectors",
        str(tmp_path / "q.npy"),
        "-k",
        "3",
    )
    assert rc == 0
    assert f"query 1 head 0: indices {indices[1, 0].tolist()}" in out
    rc, out, _ = run(
        cli_env,
        capsys,
        "query",
        "--table",
        "cli-t",
        "--vectors",
        str(tmp_path / "q.npy"),
        "-k",
        "3",
        "--out",
        str(tmp_path / "r.npy"),
    )
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), indices.numpy())
    np.testing.assert_allclose(np.load(tmp_path / "r.scores.npy"), scores.numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    "args, words",
    [
        (("describe", "nope"), ["NOT_FOUND", "nope"]),
        (("query", "--table", "cli-t", "--vectors", "/nonexistent.npy"), ["nonexistent.npy"]),
        (
            ("query", "--table", "cli-t", "--vectors", "{tmp}/bad.npy", "-k", "3"),
            ["INVALID_ARGUMENT", "q"],
        ),
    ],
)
def test_errors_are_one_line_and_exit_1(cli_env, capsys, args, words):
    np.save(cli_env["tmp"] / "bad.npy", np.ones((2, 3, 6), np.float32))  # 3 heads, keys have 2
    args = [a.replace("{tmp}", str(cli_env["tmp"])) for a in args]
    rc, out, err = run(cli_env, capsys, *args)
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err


def test_create_save_load_drop_as_a_driver(cli_env, capsys, tmp_path):
    ray_address = ["--ray-address", cli_env["ray_address"]]
    assert (
        main(
            [
                "create",
                "cli-new",
                "--rows",
                "100",
                "--dim",
                "8",
                "--shards",
                "2",
                "1",
                "--seed",
                "9",
                *ray_address,
            ]
        )
        == 0
    )
    assert "over a 2 x 1 grid" in capsys.readouterr().out
    assert main(["save", "cli-new", str(tmp_path / "ck"), *ray_address]) == 0
    assert main(["load", str(tmp_path / "ck"), "cli-copy", *ray_address]) == 0
    a = memstore.connect("cli-new").gather(torch.arange(100))
    torch.testing.assert_close(memstore.connect("cli-copy").gather(torch.arange(100)), a)
    for name in ("cli-new", "cli-copy"):
        assert main(["drop", name, *ray_address]) == 0
    assert main(["drop", "cli-new", *ray_address]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_serve_detached_and_stopped(cli_env, capsys):
    assert (
        main(
            ["serve", "--detach", "--address", "127.0.0.1:0", "--token-file", cli_env["token_file"]]
        )
        == 0
    )
    address = re.search(r"serving on (\S+)", capsys.readouterr().out).group(1)
    try:
        with MemoryClient(address, token=ADMIN) as c:
            assert "cli-t" in [t["name"] for t in c.tables()]
    finally:
        assert main(["serve", "--stop"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert main(["serve", "--stop"]) == 0
    assert "no detached server" in capsys.readouterr().out


def test_serve_in_the_foreground_until_sigterm(cli_env):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memstore.cli",
            "serve",
            "--address",
            "127.0.0.1:0",
            "--ray-address",
            cli_env["ray_address"],
            "--token-file",
            cli_env["token_file"],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        address = re.search(r"serving on (\S+);", line).group(1)
        with MemoryClient(address, token=ADMIN) as c:
            assert c.describe("cli-t")["rows"] == N * N
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "memstore.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in (
        "up",
        "down",
        "create",
        "tables",
        "describe",
        "stats",
        "save",
        "load",
        "drop",
        "serve",
        "query",
        "train",
        "bench",
        "demo",
    ):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    assert main(["bench", "nope"]) == 1


def test_the_example_client_runs(cli_env):
    env = {**os.environ, "MEMSTORE_TOKEN": ADMIN}
    out = subprocess.run(
        [
            sys.executable,
            "examples/grpc_client.py",
            "--address",
            cli_env["address"],
            "--table",
            "cli-t",
            "-k",
            "3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "cli-t: 64 rows x 4, step 0" in out.stdout and "top-3 rows of query 0" in out.stdout
