"""The text experiment: next-byte prediction on real text, a memory-layer model against its
dense twin of equal multiply-adds per token and against lucidrains' PKM as a peer.

Three models are trained by ``trainer.train`` (its CLI, one subprocess per run, one after
the other) on the same corpus with the same windows, batches, schedule and number of
steps, hence the same tokens. The last ``data.val_fraction`` of the corpus is held out:
no training window reaches into it, and every evaluation scores the same fixed windows
of it (trainer.data.text_splits), so the comparison measures prediction of unseen
text, not memorisation:

* **dense**: ``memstore/trainer/configs/text[-small]-dense.yaml``: the memory model with
  ``dense_equivalent: true``: its memory layer becomes a SwiGLU FFN of the same
  multiply-adds per token (trainer.model.dense_equivalent);
* **memory**: ``text[-small]-memory.yaml``: a transformer whose third FFN is a Memory+
  layer whose value rows live in the store (2 shards, 2 data-parallel Ray workers);
* **pkm**: ``text[-small]-pkm.yaml``: the same model with that FFN replaced by
  ``product_key_memory.PKM`` (the ``bench`` extra; ``model.pkm_peer``) of the same
  heads, k, sub-keys and key width: plain PKM (no gate), values a dense parameter of
  the model trained by the trainer's AdamW and all-reduced like any weight.

The default corpus is one every machine has without a download: the running
interpreter's standard library sources (``*.py`` under ``sysconfig``'s stdlib path,
without ``test``/``tests``/``idle_test`` folders, ``test_*.py`` files and site-packages),
concatenated in sorted path order; ``--corpus FILE`` trains on any file instead.

Reported (from each run's ``metrics.jsonl``): validation bits per byte against tokens
and against training seconds (the steps only: without start-up and evaluations;
``wall`` in the table is the whole process), at equal tokens (each run's final
evaluation) and at equal time T = the shortest run's training seconds (the others
interpolated between their evaluations); training-window bits per byte beside it.
Targets (full experiment, within 20 minutes on 2 CPU cores): at equal time the memory
model >= 10% lower validation bits per byte than the dense twin, and lower than the
PKM peer. Writes ``val_bpb_vs_tokens.png``, ``val_bpb_vs_seconds.png`` and
``summary.json`` under ``--out`` (default ``runs/text`` or ``runs/text-quick``) and
prints a markdown table.

    python -m memstore.bench.text [--quick] [--corpus FILE] [--out DIR] [--set KEY=VALUE ...]

``--set`` overrides go to every run. Run it as a module from the repository root.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse
import sys
import sysconfig
import time
from pathlib import Path

from memstore.bench._experiment import (
    MODELS,
    SCHEDULE,
    at_seconds,
    check_equal_macs,
    check_fair,
    model_differences,
    parameters,
    per_token_macs,
    train_models,
    write_summary,
)
from memstore.trainer import configs as builtin
from memstore.trainer.data import ByteDataset
from memstore.trainer.train import load_config

TARGET_VS_DENSE = 0.10  # memory's validation bpb at least 10% below the dense twin's
EVAL_KEYS = ("train_bits_per_byte", "val_bits_per_byte")
# The model fields the PKM peer may change (trainer.model.ModelArgs): the layer itself.
PEER_FIELDS = {"pkm_peer", "pkm_value_scale", "memory_plus"}
TEST_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(stdlib: Path) -> list[Path]:
    """The standard library's ``*.py`` sources, tests and installed packages excluded,
    relative to ``stdlib``, in sorted order."""
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in TEST_FOLDERS]
        rel = Path(root).relative_to(stdlib)
        files += [rel / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files)


def stdlib_corpus(path: Path) -> Path:
    """Write the default corpus to ``path`` (rewritten only when its content would
    change) and return it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / f).read_bytes() for f in stdlib_files(stdlib))
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def configs(quick: bool) -> dict[str, Path]:
    prefix = "text-small-" if quick else "text-"
    return {name: builtin.path(f"{prefix}{name}") for name in MODELS}


def check_peer(args: dict) -> None:
    """The peer differs from the memory model only in the memory layer itself."""
    p, m = args["pkm"].to_dict(), args["memory"].to_dict()
    if not args["pkm"].model.get("pkm_peer"):
        raise SystemExit("the pkm config needs model.pkm_peer: true")
    diff = [k for k in (*SCHEDULE, "dense_equivalent") if p[k] != m[k]]
    diff += model_differences(p, m, PEER_FIELDS)
    if diff:
        raise SystemExit(f"pkm and memory configs differ in {sorted(diff)}: not a fair comparison")


def plot(curves: dict, x: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        (line,) = ax.plot(c[x], c["val_bits_per_byte"], "o-", ms=3, label=f"{name}, validation")
        ax.plot(
            c[x],
            c["train_bits_per_byte"],
            ":",
            color=line.get_color(),
            lw=1,
            label=f"{name}, training windows",
        )
    ax.set_ylabel("bits per byte")
    ax.set_xlabel(
        {
            "tokens": "tokens (bytes) seen",
            "seconds": "training seconds (steps only, without start-up and evaluation)",
        }[x]
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(a, margs) -> str:
    d = a.data
    if margs.pkm_peer:
        layer = (
            f"layers {margs.memory_layers}: product_key_memory.PKM {margs.mem_n_keys}² "
            f"rows × {margs.dim}, {margs.mem_heads} heads × k={margs.mem_k}, key_dim "
            f"{margs.mem_key_dim}, values at {margs.pkm_value_scale:g} × lr (dense "
            "parameter)"
        )
    elif margs.memory_layers:
        layer = (
            f"layers {margs.memory_layers}: Memory+ {margs.mem_n_keys}² rows × "
            f"{margs.mem_value_dim}, {margs.mem_heads} heads × k={margs.mem_k}, "
            f"key_dim {margs.mem_key_dim}; store {a.store.shards} shards, "
            f"{a.store.mode.value}, value_lr {a.value_lr:g}"
        )
    else:
        layer = f"SwiGLU widths {margs.layer_ffn_hidden}"
    return (
        f"dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads, {layer}; "
        f"{a.steps} steps × {a.batch_size} windows of {d.seq_len} bytes, lr {a.lr:g}, "
        f"{a.workers} workers"
    )


def results(curves: dict, wall: dict, steps: int) -> tuple[dict, float, str]:
    """Per model: final (equal tokens) and at-T (equal time) bits per byte."""
    t_eq = min(c["total_seconds"] for c in curves.values())
    shortest = min(curves, key=lambda n: curves[n]["total_seconds"])
    res = {}
    for name, c in curves.items():
        res[name] = {
            "val_bpb": float(c["val_bits_per_byte"][-1]),
            "train_bpb": float(c["train_bits_per_byte"][-1]),
            "val_bpb_at_T": at_seconds(c, t_eq, "val_bits_per_byte"),
            "seconds": float(c["total_seconds"]),
            "wall": wall[name],
            "s_per_step": float(c["total_seconds"]) / steps,
            "tokens": int(c["total_tokens"]),
        }
    return res, t_eq, shortest


def _lower(gain: float) -> str:
    return f"{gain:.1%} lower" if gain >= 0 else f"{-gain:.1%} HIGHER"


def report(ns, args, margs, paths, res, macs, params, t_eq, shortest) -> dict:
    """Print the markdown table and verdicts; return the ratios and targets."""
    print(f"\n### Text experiment{' (--quick)' if ns.quick else ''}\n")
    d = args["memory"].data
    print(
        f"Corpus: `{d.path}`, {os.path.getsize(d.path):,} bytes, the last "
        f"{d.val_fraction:g} held out; {d.eval_windows} fixed windows per evaluation.\n"
    )
    for name in MODELS:
        print(f"- **{name}** (`{paths[name].name}`): {describe(args[name], margs[name])}")
    print(
        "\n| model | params (dense + values) | MACs/token | tokens | train s | s/step "
        "| wall s | train bpb | val bpb (equal tokens) | val bpb @ T (equal time) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODELS:
        r, p = res[name], params[name]
        print(
            f"| {name} | {p['dense']:,} + {p['values']:,} | {macs[name]['total']:,} | "
            f"{r['tokens']:,} | {r['seconds']:.0f} | {r['s_per_step']:.3f} | "
            f"{r['wall']:.0f} | {r['train_bpb']:.3f} | {r['val_bpb']:.3f} | "
            f"{r['val_bpb_at_T']:.3f} |"
        )
    gain = {k: 1 - res["memory"][k] / res["dense"][k] for k in ("val_bpb", "val_bpb_at_T")}
    ahead = {k: res["memory"][k] < res["pkm"][k] for k in ("val_bpb", "val_bpb_at_T")}
    met = {
        "vs_dense_equal_time": gain["val_bpb_at_T"] >= TARGET_VS_DENSE,
        "ahead_of_pkm_equal_time": ahead["val_bpb_at_T"],
    }
    print(
        f"\nT = {t_eq:.0f} s, the {shortest} run's training time (the shortest); '@ T' "
        "values of the other runs are interpolated between their evaluations. MACs per "
        "token exclude attention's context mixing (the same in every model)."
    )
    print(
        f"Memory vs dense, validation bits per byte: {_lower(gain['val_bpb'])} at equal "
        f"tokens, **{_lower(gain['val_bpb_at_T'])} at equal time** (target "
        f">= {TARGET_VS_DENSE:.0%}: {'met' if met['vs_dense_equal_time'] else 'MISSED'}). "
        f"Memory vs the PKM peer: {'ahead' if ahead['val_bpb'] else 'BEHIND'} at equal "
        f"tokens, **{'ahead' if ahead['val_bpb_at_T'] else 'BEHIND'} at equal time** "
        f"({res['memory']['val_bpb_at_T']:.3f} against {res['pkm']['val_bpb_at_T']:.3f})."
    )
    return {"memory_vs_dense": gain, "memory_ahead_of_pkm": ahead, "targets_met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memstore.bench.text", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the small version (text-small-*.yaml, 300 steps per model)",
    )
    parser.add_argument(
        "--corpus",
        help="a text file (default: the standard library's "
        "sources, written to runs/text-corpus/stdlib.txt)",
    )
    parser.add_argument("--out", help="output folder (default runs/text[-quick])")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of every run",
    )
    ns = parser.parse_args(argv)
    out = Path(ns.out or Path("runs") / ("text-quick" if ns.quick else "text")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = (
        Path(ns.corpus).resolve()
        if ns.corpus
        else stdlib_corpus(Path("runs") / "text-corpus" / "stdlib.txt")
    )
    overrides = [f"data.path={corpus}", *ns.set]
    paths = configs(ns.quick)
    args = {name: load_config(p, overrides) for name, p in paths.items()}
    check_fair(args)
    check_peer(args)
    margs = {name: a.model_args(ByteDataset.vocab_size) for name, a in args.items()}
    macs = {name: per_token_macs(m) for name, m in margs.items()}
    params = {name: parameters(m) for name, m in margs.items()}
    check_equal_macs(macs)

    started = time.perf_counter()
    wall, curves = train_models(paths, out, overrides, EVAL_KEYS)
    steps = args["memory"].steps
    res, t_eq, shortest = results(curves, wall, steps)
    title = (
        f"{corpus.name}: {steps} steps × {args['memory'].batch_size} × "
        f"{args['memory'].data.seq_len} bytes, W={args['memory'].workers}"
    )
    plots = {x: out / f"val_bpb_vs_{x}.png" for x in ("tokens", "seconds")}
    for x, path in plots.items():
        plot(curves, x, path, title)
    verdict = report(ns, args, margs, paths, res, macs, params, t_eq, shortest)
    total_wall = time.perf_counter() - started
    print(f"All runs: {total_wall:.0f} s wall. Plots: {plots['tokens']}, {plots['seconds']}")
    write_summary(
        out / "summary.json",
        {
            "quick": ns.quick,
            "corpus": str(corpus),
            "corpus_bytes": os.path.getsize(corpus),
            "configs": {k: str(v) for k, v in paths.items()},
            "overrides": ns.set,
            "T_seconds": t_eq,
            "results": res,
            "macs_per_token": macs,
            "parameters": params,
            **verdict,
            "wall_seconds": total_wall,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
