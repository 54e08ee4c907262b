"""memstore: run a store cluster, manage its tables, serve and query them.

Cluster:   up, down              a local multi-node Ray cluster (cluster/local/)
Tables:    create, load, save, drop   (a driver of the Ray cluster: --ray-address)
Queries:   tables, describe, stats, query   (through the gRPC server: --address)
Server:    serve                 the gRPC interface (memstore.v1.MemoryStore)
Jobs:      train, bench, demo

Other packages add subcommands through the entry-point group ``memstore.commands``
(``name = "module:main"``, called with the remaining arguments): the trainer
registers ``memstore train`` that way, so memstore itself never imports it.
Errors are printed as one line, with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import pathlib
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points

from .errors import InvalidArgument, MemstoreError

COMMANDS_GROUP = "memstore.commands"
REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = os.environ.get("MEMSTORE_ADDRESS", "127.0.0.1:50051")
log = logging.getLogger("memstore.cli")


# ---- helpers ---------------------------------------------------------------------------
def _client(ns):
    from .client import MemoryClient

    roots = pathlib.Path(ns.tls_ca).read_bytes() if ns.tls_ca else None
    return MemoryClient(  # refuses a token in clear to a non-loopback address
        ns.address,
        token_file=ns.token_file,
        root_certificates=roots,
        server_name=ns.tls_server_name,
        read_retries=2,
        insecure=ns.insecure,
    )


def _ray(ns):
    import ray

    if not ray.is_initialized():
        address = ns.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return ray


def _table_rows(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _shard_table(shards: list[dict]) -> str:
    return _table_rows(
        [
            "shard",
            "rows",
            "cols",
            "bytes",
            "step",
            "pending",
            "lookups",
            "tokens",
            "pushes",
            "rows_updated",
        ],
        [
            [
                s["block"],
                s["rows"],
                s["cols"],
                s["bytes"],
                s["last_step"],
                len(s["pending_steps"]),
                int(s.get("lookups", 0)),
                int(s.get("tokens", 0)),
                int(s.get("pushes", 0)),
                int(s.get("rows_updated", 0)),
            ]
            for s in shards
        ],
    )


# ---- gRPC commands ---------------------------------------------------------------------
def _tables(ns) -> int:
    with _client(ns) as c:
        tables = c.tables()
    print(
        _table_rows(
            ["name", "rows", "dim", "step"],
            [[t["name"], t["rows"], t["dim"], t["step"]] for t in tables],
        )
        if tables
        else "no tables"
    )
    return 0


def _describe(ns) -> int:
    with _client(ns) as c:
        d = c.describe(ns.name)
    params = ", ".join(f"{k}={v:g}" for k, v in sorted(d["optimizer_params"].items()))
    print(
        f"table {d['name']}: {d['rows']:,} rows x {d['dim']} {d['dtype']}, grid "
        f"{d['grid'][0]} x {d['grid'][1]}, {d['mode']} mode, step {d['step']}\n"
        f"optimizer {d['optimizer']} ({params}); keys "
        f"{'published' if d['keys_published'] else 'not published'}"
    )
    print(_shard_table(d["shards"]))
    return 0


def _stats(ns) -> int:
    with _client(ns) as c:
        s = c.stats(ns.name)
    print(f"table {ns.name}: step {s['step']}, {s['bytes']:,} bytes in {len(s['shards'])} shards")
    print(_shard_table(s["shards"]))
    if ns.plot:
        with _client(ns) as c:
            rows = c.row_stats(ns.name, ns.background)
        _plot_stats(ns.name, s["shards"], rows, ns.plot)
        used = int((rows["df"] > 0).sum())
        print(f"{used:,} of {len(rows['df']):,} rows read in {rows['steps']:,} counted steps")
        print(f"wrote {ns.plot}")
    return 0


def _plot_stats(name: str, shards: list[dict], rows: dict, path: str) -> None:
    """Per-shard load (tokens looked up, rows updated), row usage (updates per row), and
    the access histogram: each row's document frequency, rows sorted by use, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = [s["block"] for s in shards]
    fig, (load, usage, access) = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(blocks))
    load.bar([i - 0.2 for i in x], [s.get("tokens", 0) for s in shards], 0.4, label="tokens")
    load.bar(
        [i + 0.2 for i in x], [s.get("rows_updated", 0) for s in shards], 0.4, label="rows updated"
    )
    load.set(title=f"{name}: load per shard", xticks=list(x), xticklabels=blocks, xlabel="shard")
    load.legend()
    usage.bar(list(x), [s.get("rows_updated", 0) / max(s["rows"], 1) for s in shards])
    usage.set(title="row updates per row", xticks=list(x), xticklabels=blocks, xlabel="shard")
    df = np.sort(np.asarray(rows["df"]))[::-1]
    used = df[df > 0]
    if used.size:
        access.loglog(np.arange(1, used.size + 1), used, drawstyle="steps-post")
    access.set(
        title=f"row accesses ({used.size:,} of {df.size:,} rows read)",
        xlabel="rows, by use (rank)",
        ylabel=f"steps reading the row (of {rows['steps']:,})",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _query(ns) -> int:
    import numpy as np

    q = np.load(ns.vectors, allow_pickle=False)
    with _client(ns) as c:
        r = c.query(ns.table, q, k=ns.k, return_values=bool(ns.out and ns.out.endswith(".npz")))
    if ns.out:
        _write_query(ns.out, r)
    else:
        np.set_printoptions(precision=4, suppress=True, linewidth=120)
        for b in range(len(r.indices)):
            for h in range(r.indices.shape[1]):
                print(f"query {b} head {h}: indices {r.indices[b, h].tolist()}")
                print(f"query {b} head {h}: scores  {np.round(r.scores[b, h], 4).tolist()}")
    print(f"step {r.seen.step}", file=sys.stderr)
    return 0


def _write_query(out: str, r) -> None:
    import numpy as np

    if out.endswith(".npz"):
        np.savez(out, indices=r.indices, scores=r.scores, values=r.values)
        print(f"wrote indices, scores and values to {out}")
        return
    scores = out[: -len(".npy")] + ".scores.npy" if out.endswith(".npy") else out + ".scores.npy"
    np.save(out, r.indices)
    np.save(scores, r.scores)
    print(f"wrote indices to {out}, scores to {scores}")


# ---- Ray (driver) commands -----------------------------------------------------------
def _create(ns) -> int:
    from . import api, optim

    _ray(ns)
    optimizer = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "sgd": optim.SGD,
        "adagrad": optim.Adagrad,
        "rowwise_adagrad": optim.RowWiseAdagrad,
    }[ns.optimizer]
    shards = tuple(ns.shards) if len(ns.shards) == 2 else ns.shards[0]
    t = api.create_table(
        ns.name,
        ns.rows,
        ns.dim,
        shards=shards,
        dtype=ns.dtype,
        seed=ns.seed,
        mode=ns.mode,
        optimizer=optimizer(lr=ns.lr),
        checkpoint_root=ns.checkpoint_root,
    )
    print(
        f"created {t.name}: {t.rows:,} x {t.dim} over a {t.grid.shape[0]} x {t.grid.shape[1]} grid"
    )
    return 0


def _save(ns) -> int:
    from . import api

    _ray(ns)
    print(f"saved {ns.name} to {api.connect(ns.name).save(ns.path)}")
    return 0


def _load(ns) -> int:
    from . import api

    _ray(ns)
    shards = tuple(ns.shards) if len(ns.shards) == 2 else ns.shards[0]
    t = api.load_table(ns.path, ns.name, shards=shards)
    print(f"loaded {ns.path} as {t.name} (step {t.last_step})")
    return 0


def _drop(ns) -> int:
    from . import api

    _ray(ns)
    api.drop_table(ns.name)
    print(f"dropped {ns.name}")
    return 0


def _serve(ns) -> int:
    from . import server

    if ns.stop:
        _ray(ns)
        print(
            "stopped the detached server"
            if server.stop_detached()
            else "no detached server was running"
        )
        return 0
    options = server.ServerOptions(
        address=ns.address,
        token_file=ns.token_file,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        max_message_bytes=ns.max_message_bytes,
        save_root=ns.save_root,
        threads=ns.threads,
        call_timeout_s=ns.call_timeout,
    )
    if ns.detach:
        _ray(ns)
        print(
            f"memstore gRPC serving on {server.start_detached(options)} (detached; "
            "memstore serve --stop ends it)"
        )
        return 0
    import ray

    server.use_one_torch_thread()
    if not ray.is_initialized():  # the cluster named, else RAY_ADDRESS, else a local one
        ray.init(address=ns.ray_address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    running = server.start(options)
    print(
        f"memstore gRPC serving on {running.address}; tokens from {running.token_source}",
        flush=True,
    )
    _wait_for_signal(running)
    return 0


def _wait_for_signal(running) -> None:
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    running.stop()


# ---- cluster and jobs ------------------------------------------------------------------
def _script(name: str) -> pathlib.Path:
    path = REPO / "cluster" / "local" / name
    if not path.exists():
        raise InvalidArgument("cluster", f"{path} (the scripts of a source checkout)", "missing")
    return path


def _up(ns) -> int:
    script = _script("start-local.sh")
    return subprocess.run(["bash", str(script), str(ns.workers)], check=False).returncode


def _down(ns) -> int:
    extra = ["--node", ns.node] if ns.node else []
    return subprocess.run(["bash", str(_script("stop-local.sh")), *extra], check=False).returncode


def _benchmarks() -> list[str]:
    """The experiments installed with memstore (the modules of ``memstore.bench``)."""
    spec = importlib.util.find_spec("memstore.bench")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgument("bench", "memstore.bench, installed with memstore", "not importable")
    return sorted(
        m.name
        for m in pkgutil.iter_modules(spec.submodule_search_locations)
        if not m.ispkg and not m.name.startswith("_")
    )


def _bench(ns) -> int:
    names = _benchmarks()
    if ns.name not in names:
        raise InvalidArgument("bench", f"one of {names}", ns.name)
    # In the current folder: the benchmarks write their runs under it (runs/...).
    return subprocess.run(
        [sys.executable, "-m", f"memstore.bench.{ns.name}", *ns.args], check=False
    ).returncode


def _demo(ns) -> int:
    from .demo import DemoArgs, run_demo

    args = DemoArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(DemoArgs)})
    r = run_demo(args)
    print(
        f"table {r.rows:,} rows x {args.dim}: loss {r.first_loss:.4f} -> {r.last_loss:.4f} in "
        f"{args.steps} steps; {r.tokens_per_s:,.0f} tokens/s, {r.rows_read_per_s / 1e6:.1f} M "
        f"rows read/s (lookup + backward + sparse Adam, in-process, {r.seconds:.1f} s)"
    )
    return 0


# ---- parser ------------------------------------------------------------------------------
def _grpc_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="HOST:PORT of `memstore serve` (default $MEMSTORE_ADDRESS or %(default)s)",
    )
    g.add_argument(
        "--token-file",
        help="file whose first token is sent (default "
        "$MEMSTORE_TOKEN, else ~/.memstore/grpc-token)",
    )
    g.add_argument("--tls-ca", help="PEM root certificate(s): use TLS")
    g.add_argument("--tls-server-name", help="name the server certificate is checked against")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="send the token without TLS to a non-loopback address (refused otherwise)",
    )


def _ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        help="the Ray cluster (default $RAY_ADDRESS, else the running local cluster)",
    )


def _shards_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shards",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="S shards, or R C for an R x C grid (default 1)",
    )


def _add_cluster_commands(sub) -> None:
    up = sub.add_parser("up", help="start a local multi-node Ray cluster (real raylets)")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.set_defaults(run=_up)
    down = sub.add_parser("down", help="stop the local cluster (or one node of it)")
    down.add_argument("--node", help="stop only the node with this IP")
    down.set_defaults(run=_down)


def _add_table_commands(sub) -> None:
    p = sub.add_parser("create", help="create a table on the Ray cluster")
    p.add_argument("name")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    _shards_option(p)
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "adamw", "sgd", "adagrad", "rowwise_adagrad"],
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", default="sync", choices=["sync", "async"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-root", help="where restarted shards find checkpoints")
    _ray_option(p)
    p.set_defaults(run=_create)
    p = sub.add_parser("load", help="create a table from a checkpoint, on any grid")
    p.add_argument("path")
    p.add_argument("name")
    _shards_option(p)
    _ray_option(p)
    p.set_defaults(run=_load)
    p = sub.add_parser("save", help="checkpoint a table (one file per shard, manifest last)")
    p.add_argument("name")
    p.add_argument("path")
    _ray_option(p)
    p.set_defaults(run=_save)
    p = sub.add_parser("drop", help="delete a table and free its shards")
    p.add_argument("name")
    _ray_option(p)
    p.set_defaults(run=_drop)


def _add_query_commands(sub) -> None:
    p = sub.add_parser("tables", help="list the tables (gRPC)")
    _grpc_options(p)
    p.set_defaults(run=_tables)
    p = sub.add_parser("describe", help="a table's shape, optimizer, step and shards (gRPC)")
    p.add_argument("name")
    _grpc_options(p)
    p.set_defaults(run=_describe)
    p = sub.add_parser("stats", help="per-shard counters of a table (gRPC)")
    p.add_argument("name")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw per-shard load, row usage and the access histogram of the rows",
    )
    p.add_argument(
        "--background",
        metavar="NAME",
        help="with --plot: the row statistics snapshotted as NAME (default: counted so far)",
    )
    _grpc_options(p)
    p.set_defaults(run=_stats)
    p = sub.add_parser("query", help="top-k rows for query vectors over the published keys (gRPC)")
    p.add_argument("--table", required=True)
    p.add_argument("--vectors", required=True, help=".npy of shape (B, H, Dk)")
    p.add_argument("-k", type=int, default=32, help="rows per head (default 32)")
    p.add_argument(
        "--out",
        help="write indices to OUT.npy and scores to OUT.scores.npy, or "
        "indices, scores and values to OUT.npz; default: print them",
    )
    _grpc_options(p)
    p.set_defaults(run=_query)


def _add_serve_command(sub) -> None:
    from .server import DEFAULT_ADDRESS as SERVE_ADDRESS
    from .server import DEFAULT_CALL_TIMEOUT_S, DEFAULT_MAX_MESSAGE_BYTES

    p = sub.add_parser(
        "serve",
        help="serve every table over gRPC (memstore.v1.MemoryStore)",
        description="Serve every table of the Ray cluster over gRPC. Calls "
        "need a bearer token: from --token-file, else $MEMSTORE_TOKEN, else "
        "a token generated into ~/.memstore/grpc-token (mode 0600).",
    )
    p.add_argument(
        "--address",
        default=SERVE_ADDRESS,
        help="HOST:PORT to bind (default %(default)s: this machine only)",
    )
    _ray_option(p)
    p.add_argument(
        "--detach",
        action="store_true",
        help="run as a detached Ray actor on this node that lives with the cluster; it "
        "reads its tokens from --token-file or ~/.memstore/grpc-token (not $MEMSTORE_TOKEN)",
    )
    p.add_argument("--stop", action="store_true", help="stop the detached server")
    p.add_argument(
        "--token-file",
        help="tokens, one per line: TOKEN [read,write,admin] [tables=NAME,...]",
    )
    p.add_argument("--tls-cert", help="PEM certificate (with --tls-key): serve TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request or reply (default %(default)s)",
    )
    p.add_argument("--save-root", help="directory Save may write under (default: Save refused)")
    p.add_argument("--threads", type=int, default=16, help="calls running on the shards at once")
    p.add_argument(
        "--call-timeout",
        type=float,
        default=DEFAULT_CALL_TIMEOUT_S,
        help="longest a call may take, whatever deadline it asks for (default %(default)s s)",
    )
    p.set_defaults(run=_serve)


def _add_job_commands(sub, plugins: dict, with_demo_options: bool) -> None:
    p = sub.add_parser(
        "bench",
        help="run an experiment of memstore.bench by name",
        description="memstore bench NAME [ARGS...] runs python -m "
        "memstore.bench.NAME ARGS in the current folder (e.g. memstore bench "
        "facts --quick).",
    )
    p.add_argument("name", help="facts or text")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(run=_bench)
    demo = sub.add_parser("demo", help="train a MemoryLayer with a 1M-row in-process table")
    if with_demo_options:
        from .demo import DemoArgs

        for field in dataclasses.fields(DemoArgs):
            demo.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    demo.set_defaults(run=_demo)
    for name, ep in sorted(plugins.items()):
        if name != "demo":
            sub.add_parser(name, help=f"from {ep.value}; memstore {name} -h lists its options")


def build_parser(plugins: dict, command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memstore",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_cluster_commands(sub)
    _add_table_commands(sub)
    _add_query_commands(sub)
    _add_serve_command(sub)
    _add_job_commands(sub, plugins, with_demo_options=command == "demo")
    return parser


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = _plugins()
    if argv and argv[0] in plugins and argv[0] != "demo":
        return int(plugins[argv[0]].load()(argv[1:]) or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser(plugins, argv[0] if argv else None).parse_args(argv)
    try:
        return int(ns.run(ns) or 0)
    except (MemstoreError, OSError, ValueError, ConnectionError) as e:
        print(f"memstore {ns.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
