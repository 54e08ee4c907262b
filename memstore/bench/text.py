"""The text experiment: next-byte prediction on real text, a memory-layer model and an
Engram model, each against its dense twin of equal multiply-adds per token, and the
memory model against lucidrains' PKM as a peer.

Five models are trained by ``trainer.train`` (its CLI, one subprocess per run, one after
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
  the model trained by the trainer's AdamW and all-reduced like any weight;
* **engram**: ``text[-small]-engram.yaml``: the same backbone with plain SwiGLU FFNs and
  an Engram layer (memstore.EngramLayer: hashed byte n-grams, gate and causal
  convolution) after its first layer, its rows in one value table of the store;
* **engram-dense**: the Engram config with ``dense_equivalent: true`` (a ``--set`` of
  that run): the Engram layer gone, the FFN of its layer widened by its multiply-adds.
  The Engram layer costs more multiply-adds per token than the memory layer (8% more
  FFN-slot work in the shipped configs, beyond the 1% that ``check_equal_macs``
  allows), so the memory model's twin is not Engram's and each has its own.

Parameters are counted apart from multiply-adds for every model: dense parameters, and
value rows × width of the store's tables (the memory values and the Engram rows) or of
the peer's value parameter.

The default corpus is one every machine has without a download: the running
interpreter's standard library sources (``*.py`` under ``sysconfig``'s stdlib path,
without ``test``/``tests``/``idle_test`` folders, ``test_*.py`` files and site-packages),
concatenated in sorted path order; ``--corpus FILE`` trains on any file instead.

Reported (from each run's ``metrics.jsonl``): validation bits per byte against tokens
and against training seconds (the steps only: without start-up and evaluations;
``wall`` in the table is the whole process), at equal tokens (each run's final
evaluation) and at equal time T = the shortest run's training seconds (the others
interpolated between their evaluations); training-window bits per byte beside it.
Targets (full experiment): at equal time the memory model and the Engram model each >=
10% lower validation bits per byte than its dense twin, and the memory model lower than
the PKM peer. Writes ``val_bpb_vs_tokens.png``, ``val_bpb_vs_seconds.png`` and
``summary.json`` under ``--out`` (default ``runs/text`` or ``runs/text-quick``) and
prints a markdown table.

    python -m memstore.bench.text [--quick] [--corpus FILE] [--out DIR] [--set KEY=VALUE ...]
        [--models NAME ...]

``--set`` overrides go to every run. ``--models`` trains only the models named (default
all five; the configs of all are still loaded and checked for a fair comparison): the
table, the gains and the targets then cover the pairs trained, and the figures go to
``text[_quick]_<models>`` instead of ``text[_quick]``. Run it as a module from the
repository root.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse
import dataclasses
import sys
import sysconfig
import time
from pathlib import Path

from memstore.bench._experiment import (
    SCHEDULE,
    at_seconds,
    check_equal_macs,
    check_fair,
    model_differences,
    parameters,
    per_token_macs,
    text_experiment_parser,
    train_models,
    write_summary,
)
from memstore.trainer import configs as builtin
from memstore.trainer.data import ByteDataset
from memstore.trainer.model import ModelArgs, engram_table, table_specs
from memstore.trainer.train import load_config

# The models in the order they train and the table shows them, and the config each is
# made from (text[-small]-<config>.yaml) with the overrides of its run alone.
MODELS = ("dense", "memory", "pkm", "engram", "engram-dense")
CONFIG_OF = {name: name for name in MODELS} | {"engram-dense": "engram"}
MODEL_OVERRIDES = {"engram-dense": ["dense_equivalent=true"]}
# Each model with a layer of value rows, and its dense twin of equal multiply-adds.
TWINS = {"memory": "dense", "engram": "engram-dense"}
TARGET_VS_DENSE = 0.10  # a model's validation bpb at least 10% below its dense twin's
EVAL_KEYS = ("train_bits_per_byte", "val_bits_per_byte")
# The model fields the PKM peer may change (trainer.model.ModelArgs): the layer itself.
PEER_FIELDS = {"pkm_peer", "pkm_value_scale", "memory_plus"}
# Those in which the Engram model may differ from the memory model: both layers' own.
LAYER_FIELDS = {
    f.name
    for f in dataclasses.fields(ModelArgs)
    if f.name.startswith(("mem_", "memory_", "engram_")) or f.name == "shared_memory"
}
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
    return {name: builtin.path(f"{prefix}{CONFIG_OF[name]}") for name in MODELS}


def trained_twins(names) -> dict[str, str]:
    """The pairs of TWINS whose models are both among ``names``."""
    return {m: d for m, d in TWINS.items() if m in names and d in names}


def load_runs(paths: dict[str, Path], overrides: list[str]) -> tuple[dict, dict]:
    """Each model's TrainArgs (``overrides``, then its own ``MODEL_OVERRIDES``) and
    ModelArgs, checked for a fair comparison."""
    args = {
        name: load_config(p, [*overrides, *MODEL_OVERRIDES.get(name, [])])
        for name, p in paths.items()
    }
    for model, dense in TWINS.items():
        check_fair(args, dense, model)
    check_peer(args)
    check_engram(args)
    margs = {name: a.model_args(ByteDataset.vocab_size) for name, a in args.items()}
    return args, margs


def check_engram(args: dict) -> None:
    """The Engram model differs from the memory model only in its layer: the same
    backbone, data, batches, schedule and steps."""
    e, m = args["engram"].to_dict(), args["memory"].to_dict()
    if not args["engram"].model.get("engram_layers"):
        raise SystemExit("the engram config needs model.engram_layers")
    diff = [k for k in SCHEDULE if e[k] != m[k]]
    diff += model_differences(e, m, LAYER_FIELDS)
    if diff:
        raise SystemExit(
            f"engram and memory configs differ in {sorted(diff)}: not a fair comparison"
        )


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


def describe_layers(a, margs) -> str:
    """The model's memory, PKM or Engram layers, or its FFN widths if it has none."""
    store = f"store {a.store.shards} shards, {a.store.mode.value}, value_lr {a.value_lr:g}"
    layers = []
    if margs.pkm_peer:
        layers.append(
            f"layers {margs.memory_layers}: product_key_memory.PKM {margs.mem_n_keys}² "
            f"rows × {margs.dim}, {margs.mem_heads} heads × k={margs.mem_k}, key_dim "
            f"{margs.mem_key_dim}, values at {margs.pkm_value_scale:g} × lr (dense "
            "parameter)"
        )
    elif margs.memory_layers:
        layers.append(
            f"layers {margs.memory_layers}: Memory+ {margs.mem_n_keys}² rows × "
            f"{margs.mem_value_dim}, {margs.mem_heads} heads × k={margs.mem_k}, "
            f"key_dim {margs.mem_key_dim}; {store}"
        )
    if margs.engram_layers:
        rows = table_specs(margs)[engram_table(margs.engram_layers[0])][0]
        layers.append(
            f"Engram after layers {margs.engram_layers}: byte n-grams of orders "
            f"{margs.engram_orders}, {margs.engram_heads} hash heads per order, {rows:,} "
            f"rows × {margs.engram_dim} per layer, convolution of {margs.engram_kernel} "
            f"taps; {store}"
        )
    return "; ".join(layers) or f"SwiGLU widths {margs.layer_ffn_hidden}"


def describe(a, margs) -> str:
    d = a.data
    layer = describe_layers(a, margs)
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


def gains(res: dict, model: str, twin: str) -> dict[str, float]:
    """How much lower ``model``'s validation bits per byte are than ``twin``'s, as a
    fraction of the twin's: at equal tokens (``val_bpb``) and equal time (``val_bpb_at_T``)."""
    return {k: 1 - res[model][k] / res[twin][k] for k in ("val_bpb", "val_bpb_at_T")}


def verdict(res: dict) -> dict:
    """Each layer model against its dense twin, the memory model against the PKM peer,
    and the targets: of the models in ``res`` (the pairs trained)."""
    gain = {model: gains(res, model, twin) for model, twin in trained_twins(res).items()}
    out, met = {}, {}
    for model, target in (
        ("memory", "vs_dense_equal_time"),
        ("engram", "engram_vs_dense_equal_time"),
    ):
        if model in gain:
            out[f"{model}_vs_dense"] = gain[model]
            met[target] = gain[model]["val_bpb_at_T"] >= TARGET_VS_DENSE
    if "memory" in res and "pkm" in res:
        ahead = {k: res["memory"][k] < res["pkm"][k] for k in ("val_bpb", "val_bpb_at_T")}
        out["memory_ahead_of_pkm"] = ahead
        met["ahead_of_pkm_equal_time"] = ahead["val_bpb_at_T"]
    return {**out, "targets_met": met}


def print_table(res: dict, macs: dict, params: dict) -> None:
    print(
        "\n| model | params (dense + values) | MACs/token | tokens | train s | s/step "
        "| wall s | train bpb | val bpb (equal tokens) | val bpb @ T (equal time) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in res:
        r, p = res[name], params[name]
        print(
            f"| {name} | {p['dense']:,} + {p['values']:,} | {macs[name]['total']:,} | "
            f"{r['tokens']:,} | {r['seconds']:.0f} | {r['s_per_step']:.3f} | "
            f"{r['wall']:.0f} | {r['train_bpb']:.3f} | {r['val_bpb']:.3f} | "
            f"{r['val_bpb_at_T']:.3f} |"
        )


def report(ns, args, margs, paths, res, macs, params, t_eq, shortest) -> dict:
    """Print the markdown table and verdicts; return the ratios and targets."""
    print(f"\n### Text experiment{' (--quick)' if ns.quick else ''}\n")
    d = args["memory"].data
    print(
        f"Corpus: `{d.path}`, {os.path.getsize(d.path):,} bytes, the last "
        f"{d.val_fraction:g} held out; {d.eval_windows} fixed windows per evaluation.\n"
    )
    for name in res:
        config = " ".join(
            [f"`{paths[name].name}`", *(f"`--set {o}`" for o in MODEL_OVERRIDES.get(name, []))]
        )
        print(f"- **{name}** ({config}): {describe(args[name], margs[name])}")
    print_table(res, macs, params)
    v = verdict(res)
    print(
        f"\nT = {t_eq:.0f} s, the {shortest} run's training time (the shortest); '@ T' "
        "values of the other runs are interpolated between their evaluations. MACs per "
        "token exclude attention's context mixing (the same in every model)."
    )
    for model, twin in trained_twins(res).items():
        gain = v[f"{model}_vs_dense"]
        met = gain["val_bpb_at_T"] >= TARGET_VS_DENSE
        print(
            f"{model.capitalize()} vs {twin}, validation bits per byte: "
            f"{_lower(gain['val_bpb'])} at equal tokens, **{_lower(gain['val_bpb_at_T'])} "
            f"at equal time** (target >= {TARGET_VS_DENSE:.0%}: {'met' if met else 'MISSED'})."
        )
    ahead = v.get("memory_ahead_of_pkm")
    if ahead is not None:
        print(
            f"Memory vs the PKM peer: {'ahead' if ahead['val_bpb'] else 'BEHIND'} at equal "
            f"tokens, **{'ahead' if ahead['val_bpb_at_T'] else 'BEHIND'} at equal time** "
            f"({res['memory']['val_bpb_at_T']:.3f} against {res['pkm']['val_bpb_at_T']:.3f})."
        )
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = text_experiment_parser(
        "python -m memstore.bench.text",
        __doc__,
        "the small version (text-small-*.yaml, 300 steps per model)",
        "runs/text[-quick]",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        metavar="NAME",
        help=f"train only these models, of {', '.join(MODELS)} (default: all)",
    )
    ns = parser.parse_args(argv)
    ns.models = [name for name in MODELS if name in ns.models]  # in training order
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    out = Path(ns.out or Path("runs") / ("text-quick" if ns.quick else "text")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = (
        Path(ns.corpus).resolve()
        if ns.corpus
        else stdlib_corpus(Path("runs") / "text-corpus" / "stdlib.txt")
    )
    overrides = [f"data.path={corpus}", *ns.set]
    paths = configs(ns.quick)
    args, margs = load_runs(paths, overrides)
    macs = {name: per_token_macs(m) for name, m in margs.items()}
    params = {name: parameters(m) for name, m in margs.items()}
    for model, dense in TWINS.items():
        check_equal_macs(macs, model, dense)

    started = time.perf_counter()
    trained = {name: paths[name] for name in ns.models}
    wall, curves = train_models(trained, out, overrides, EVAL_KEYS, MODEL_OVERRIDES)
    steps = args["memory"].steps
    res, t_eq, shortest = results(curves, wall, steps)
    title = (
        f"{corpus.name}: {steps} steps × {args['memory'].batch_size} × "
        f"{args['memory'].data.seq_len} bytes, W={args['memory'].workers}"
    )
    plots = {x: out / f"val_bpb_vs_{x}.png" for x in ("tokens", "seconds")}
    for x, path in plots.items():
        plot(curves, x, path, title)
    verdicts = report(ns, args, margs, paths, res, macs, params, t_eq, shortest)
    total_wall = time.perf_counter() - started
    print(f"All runs: {total_wall:.0f} s wall. Plots: {plots['tokens']}, {plots['seconds']}")
    write_summary(
        out / "summary.json",
        {
            "quick": ns.quick,
            "corpus": str(corpus),
            "corpus_bytes": os.path.getsize(corpus),
            "configs": {k: str(v) for k, v in trained.items()},
            "model_overrides": MODEL_OVERRIDES,
            "overrides": ns.set,
            "twins": TWINS,
            "T_seconds": t_eq,
            "results": res,
            "macs_per_token": {name: macs[name] for name in trained},
            "parameters": {name: params[name] for name in trained},
            **verdicts,
            "wall_seconds": total_wall,
        },
    )
    command = " ".join(["python -m memstore.bench.text", *(sys.argv[1:] if argv is None else argv)])
    record_result(ns, command, res, t_eq, verdicts)
    return 0


def record_result(ns, command: str, res: dict, t_eq: float, verdicts: dict) -> None:
    """From a clone, also write the figures to benchmarks/results/ (the docs' data).
    A run with ``--set`` or another corpus measures other runs than the page describes."""
    if ns.set or ns.corpus:
        return
    try:
        from benchmarks._results import write_result
    except ImportError:  # an installed package: no benchmarks folder
        return
    figures = {
        name: {
            "train s": r["seconds"],
            "s/step": r["s_per_step"],
            "train bpb": r["train_bpb"],
            "val bpb": r["val_bpb"],
            "val bpb @ T": r["val_bpb_at_T"],
        }
        for name, r in res.items()
    }
    notes = [f"T = {t_eq:.0f} s."]
    for model, twin in trained_twins(res).items():
        gain = verdicts[f"{model}_vs_dense"]
        notes.append(
            f"{model.capitalize()}'s validation bits per byte against {twin}: "
            f"{_lower(gain['val_bpb'])} at equal tokens, {_lower(gain['val_bpb_at_T'])} "
            "at equal time."
        )
    area = "text_quick" if ns.quick else "text"
    title = f"Text experiment ({'quick' if ns.quick else 'full'} form)"
    if len(ns.models) < len(MODELS):  # a part of the experiment: beside the whole one
        area += "_" + "_".join(name.replace("-", "_") for name in ns.models)
        title += f": {', '.join(ns.models)}"
    write_result(area, figures, command, title=title, notes=" ".join(notes))


if __name__ == "__main__":
    sys.exit(main())
