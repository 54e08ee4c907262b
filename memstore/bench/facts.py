"""The facts experiment: a memory-layer model against its dense baseline of equal FLOPs and
against lucidrains' PKM as the peer a user would pick instead.

Three models are trained by ``trainer.train`` (its CLI, one subprocess per run, one after
the other) on the same synthetic facts corpus (E entities × A attributes, values drawn
from V; trainer.data.FactsCorpus), with the same batches, schedule and number of steps,
hence the same number of tokens:

* **dense**: ``facts-dense.yaml``, the memory model with ``dense_equivalent: true``: the
  memory layer becomes a SwiGLU FFN of the same multiply-adds per token
  (trainer.model.dense_equivalent), so both models have the same per-token FLOPs; the
  memory model has more parameters, not more compute;
* **memory**: ``facts-memory.yaml``, a small transformer whose last FFN is a memory layer
  whose value rows live in the store (2 shards, 2 data-parallel Ray workers);
* **pkm**: ``facts-pkm.yaml``, the same model with that FFN replaced by
  ``product_key_memory.PKM`` (the ``bench`` extra; ``model.pkm_peer``) of the same heads,
  k, sub-keys and key width; its values are a dense parameter trained in an Adam group
  of their own at the memory model's value lr (``model.pkm_value_group``), in-process
  on the same number of CPU threads.

``--quick`` runs the ``facts-small-*.yaml`` configs instead: a smaller corpus and fewer
steps, the same models, a few minutes on 2 cores. The configs are the trainer's built-in
ones (``trainer.configs``), so this runs from an installed package too
(``memstore bench facts --quick``).

What is reported (from each run's ``metrics.jsonl``):

* exact-match **recall** over every fact (argmax over the V value tokens) and the
  answer **NLL** (nats, full softmax), at every evaluation, against tokens seen and
  against **seconds** = the trainer's training time (the steps only: without Ray
  start-up, evaluations and checkpoints; ``wall`` in the table is the whole process),
  and the median step in ms;
* **at equal tokens**: the final evaluation of each run (same tokens by construction);
* **at equal time**: T = the shortest run's training seconds; each model's recall and
  NLL at T, linearly interpolated between its evaluations in seconds;
* **steps and seconds to 0.9 recall** per model, linear between the two evaluations
  around the crossing (the steps are deterministic, the seconds depend on the load);
* ratios memory / dense of recall at equal tokens and at equal time, and the memory
  model's seconds to 0.9 recall over the peer's.

Targets (the full experiment within 20 minutes on 2 CPU cores): memory recall >= 2x
dense at equal tokens and >= 1.5x at equal time, with the dense model short of full
recall; memory over Ray at most half the peer's seconds to 0.9 recall. Writes
``recall_vs_tokens.png``, ``recall_vs_seconds.png`` (recall on top, NLL below) and
``summary.json`` under ``--out`` (default ``runs/facts`` or ``runs/facts-quick`` in the
current folder) and prints a markdown table.

    python -m memstore.bench.facts [--quick] [--out DIR] [--set KEY=VALUE ...]

``--set`` overrides go to every run (e.g. ``--set steps=200``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from memstore.bench._experiment import (
    MODELS,
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
from memstore.trainer.config import load_config
from memstore.trainer.data import FactsCorpus

TARGET_TOKENS = 2.0  # memory recall / dense recall at equal tokens
TARGET_TIME = 1.5  # ... at equal training time
FULL_RECALL = 0.99  # "the dense model does not reach full recall"
RECALL_MARK = 0.9  # steps and seconds to this recall
TARGET_VS_PEER = 0.5  # memory's seconds to RECALL_MARK / the peer's
# The model fields the peer may change (trainer.model.ModelArgs): the layer itself.
PEER_FIELDS = {"pkm_peer", "pkm_value_scale", "pkm_value_group", "memory_plus"}
# The peer trains in-process (over Ray it would all-reduce its dense values every step).
PEER_RUNS_APART = {"workers", "threads_per_worker", "store", "run_dir"}


def configs(quick: bool) -> dict[str, Path]:
    prefix = "facts-small-" if quick else "facts-"
    return {name: builtin.path(f"{prefix}{name}") for name in MODELS}


def check_peer(args: dict) -> None:
    """The peer differs from the memory model only in the memory layer itself and in
    running in-process; its values train at the memory model's value lr."""
    p, m = args["pkm"].to_dict(), args["memory"].to_dict()
    if not (p["model"].get("pkm_peer") and p["model"].get("pkm_value_group")):
        raise SystemExit("the pkm config needs model.pkm_peer and model.pkm_value_group true")
    diff = [
        k for k in set(p) | set(m) if k not in PEER_RUNS_APART | {"model"} and p.get(k) != m.get(k)
    ]
    diff += model_differences(p, m, PEER_FIELDS)
    if diff:
        raise SystemExit(f"pkm and memory configs differ in {sorted(diff)}: not a fair comparison")


def first_reaching(c: dict, mark: float) -> dict | None:
    """Step and seconds at which recall first reaches ``mark``, linear between the last
    evaluation below it and the first at or above it; None when no evaluation does."""
    above = np.flatnonzero(c["recall"] >= mark)
    if not len(above):
        return None
    i = int(above[0])
    if i == 0:
        return {"step": float(c["step"][0]), "seconds": float(c["seconds"][0])}
    r0, r1 = c["recall"][i - 1], c["recall"][i]
    f = (mark - r0) / (r1 - r0)
    return {x: float(c[x][i - 1] + f * (c[x][i] - c[x][i - 1])) for x in ("step", "seconds")}


def plot(curves: dict, x: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, c in curves.items():
        top.plot(c[x], c["recall"], "o-", ms=3, label=name)
        bottom.plot(c[x], c["nll"], "o-", ms=3, label=name)
    top.axhline(RECALL_MARK, color="grey", lw=0.8, ls="--")
    top.set_ylabel("exact-match recall")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    bottom.set_ylabel("answer NLL (nats)")
    bottom.grid(alpha=0.3)
    bottom.set_xlabel(
        {
            "tokens": "tokens seen",
            "seconds": "training seconds (steps only, without start-up and evaluation)",
        }[x]
    )
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plain(setting) -> str:
    """A config setting as written in the YAML (an enum member's value)."""
    return str(getattr(setting, "value", setting))


def describe(a, margs) -> str:
    d = a.data
    if margs.pkm_peer:
        layer = (
            f"layers {margs.memory_layers}: product_key_memory.PKM {margs.mem_n_keys}² "
            f"rows × {margs.dim}, {margs.mem_heads} heads × k={margs.mem_k}, key_dim "
            f"{margs.mem_key_dim}; values a dense parameter in their own Adam group"
        )
    elif margs.memory_layers:
        layer = (
            f"layers {margs.memory_layers}: {'Memory+' if margs.memory_plus else 'PKM'} "
            f"{margs.mem_n_keys}² = {margs.mem_n_keys**2:,} rows × "
            f"{margs.mem_value_dim}, {margs.mem_heads} heads × k={margs.mem_k}, "
            f"key_dim {margs.mem_key_dim}; store {a.store.shards} shards, "
            f"{_plain(a.store.mode)}"
        )
    else:
        layer = f"SwiGLU widths {margs.layer_ffn_hidden}"
    values = (
        f", value_lr {a.value_lr:g} ({_plain(a.value_schedule)})" if margs.memory_layers else ""
    )
    return (
        f"dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads, {layer}; "
        f"facts {d.entities}×{d.attributes} (V={d.values}); {a.steps} steps × "
        f"batch {a.batch_size}, lr {a.lr:g}{values}, "
        + (f"{a.workers} Ray workers" if a.workers else "in-process")
    )


def results(curves: dict, wall: dict) -> tuple[dict, float, str]:
    """Per model: final (equal tokens), at-T (equal time) and first-0.9 figures."""
    shortest = min(curves, key=lambda n: curves[n]["total_seconds"])
    t_eq = float(curves[shortest]["total_seconds"])
    res = {}
    for name, c in curves.items():
        res[name] = {
            "recall": float(c["recall"][-1]),
            "nll": float(c["nll"][-1]),
            "recall_at_T": at_seconds(c, t_eq, "recall"),
            "nll_at_T": at_seconds(c, t_eq, "nll"),
            "seconds": float(c["total_seconds"]),
            "wall": wall[name],
            "step_ms": c["step_ms"],
            "tokens": int(c["total_tokens"]),
            "to_recall_mark": first_reaching(c, RECALL_MARK),
        }
    return res, t_eq, shortest


def verdicts(res: dict) -> dict:
    """The ratios and whether each target was met."""
    ratio_tokens = res["memory"]["recall"] / max(res["dense"]["recall"], 1e-12)
    ratio_time = res["memory"]["recall_at_T"] / max(res["dense"]["recall_at_T"], 1e-12)
    mem, peer = res["memory"]["to_recall_mark"], res["pkm"]["to_recall_mark"]
    vs_peer = None
    if mem is not None and peer is not None:
        vs_peer = mem["seconds"] / peer["seconds"]
    elif mem is not None:
        vs_peer = 0.0  # the peer never got there
    return {
        "ratio_equal_tokens": ratio_tokens,
        "ratio_equal_time": ratio_time,
        "memory_over_pkm_seconds_to_mark": vs_peer,
        "targets_met": {
            "tokens": ratio_tokens >= TARGET_TOKENS,
            "time": ratio_time >= TARGET_TIME,
            "dense_short_of_full_recall": res["dense"]["recall"] < FULL_RECALL,
            "half_the_peer_s_to_mark": vs_peer is not None and vs_peer <= TARGET_VS_PEER,
        },
    }


def _mark(r: dict) -> str:
    m = r["to_recall_mark"]
    return "not reached | not reached" if m is None else f"{m['step']:.0f} | {m['seconds']:.1f}"


def _loads(loads: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.1f}" for x in loads)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(quick: bool, args, margs, paths, res, macs, params, t_eq, shortest) -> dict:
    """Print the markdown table and verdicts; return the verdicts."""
    print(f"\n### Facts experiment{' (--quick)' if quick else ''}\n")
    for name in MODELS:
        print(f"- **{name}** (`{paths[name].name}`): {describe(args[name], margs[name])}")
    print(
        f"\n| model | params (dense + values) | MACs/token | tokens | train s | ms/step "
        f"| wall s | recall | NLL | recall @ T | NLL @ T | steps to {RECALL_MARK} "
        f"| s to {RECALL_MARK} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODELS:
        r, p = res[name], params[name]
        print(
            f"| {name} | {p['dense']:,} + {p['values']:,} | {macs[name]['total']:,} | "
            f"{r['tokens']:,} | {r['seconds']:.0f} | {r['step_ms']:.0f} | {r['wall']:.0f} | "
            f"{r['recall']:.4f} | "
            f"{r['nll']:.3f} | {r['recall_at_T']:.4f} | {r['nll_at_T']:.3f} | {_mark(r)} |"
        )
    v = verdicts(res)
    met = v["targets_met"]
    print(
        f"\nT = {t_eq:.0f} s, the {shortest} run's training time (the shortest); '@ T' "
        f"values of the other runs are interpolated between their evaluations, and so "
        f"are the steps and seconds to {RECALL_MARK} recall."
    )
    print(
        f"Memory / dense recall: **{v['ratio_equal_tokens']:.2f}×** at equal tokens "
        f"(target ≥ {TARGET_TOKENS}×: {_met(met['tokens'])}), "
        f"**{v['ratio_equal_time']:.2f}×** at equal time (target ≥ {TARGET_TIME}×: "
        f"{_met(met['time'])}); dense final recall {res['dense']['recall']:.4f} "
        f"({'short of' if met['dense_short_of_full_recall'] else 'AT'} full recall)."
    )
    vs_peer = v["memory_over_pkm_seconds_to_mark"]
    shown = (
        "memory never reached it"
        if vs_peer is None
        else "the peer never reached it"
        if res["pkm"]["to_recall_mark"] is None
        else f"**{vs_peer:.2f}×**"
    )
    print(
        f"Memory's seconds to {RECALL_MARK} recall over the PKM peer's: {shown} "
        f"(target ≤ {TARGET_VS_PEER}×: {_met(met['half_the_peer_s_to_mark'])})."
    )
    return v


def load_runs(names: dict[str, Path], overrides: list[str]):
    """Each model's TrainArgs and ModelArgs, checked for a fair comparison."""
    args = {name: load_config(p, overrides) for name, p in names.items()}
    check_fair(args)
    check_peer(args)
    d = args["memory"].data
    vocab = FactsCorpus(d.entities, d.attributes, d.values, seed=d.seed).vocab_size
    margs = {name: a.model_args(vocab) for name, a in args.items()}
    return args, margs


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    parser = argparse.ArgumentParser(
        prog="python -m memstore.bench.facts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="the small version (facts-small-*.yaml), a few minutes"
    )
    parser.add_argument("--out", help="output folder (default runs/facts[-quick])")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of every run",
    )
    ns = parser.parse_args(argv)
    if importlib.util.find_spec("product_key_memory") is None:
        raise SystemExit("the PKM peer needs product-key-memory: pip install 'memstore[bench]'")
    out = Path(ns.out or Path("runs") / ("facts-quick" if ns.quick else "facts")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = configs(ns.quick)
    args, margs = load_runs(paths, ns.set)
    macs = {name: per_token_macs(m) for name, m in margs.items()}
    params = {name: parameters(m) for name, m in margs.items()}
    check_equal_macs(macs)

    load = {"before": os.getloadavg()}
    started = time.perf_counter()
    wall, curves = train_models(paths, out, ns.set, ("recall", "nll"))
    res, t_eq, shortest = results(curves, wall)
    d = args["memory"].data
    title = (
        f"facts {d.entities}×{d.attributes} (V={d.values}), "
        f"{args['memory'].steps} steps, W={args['memory'].workers} (pkm in-process)"
    )
    plots = {x: out / f"recall_vs_{x}.png" for x in ("tokens", "seconds")}
    for x, path in plots.items():
        plot(curves, x, path, title)
    verdict = report(ns.quick, args, margs, paths, res, macs, params, t_eq, shortest)
    total_wall = time.perf_counter() - started
    load["after"] = os.getloadavg()
    print(
        f"All runs: {total_wall:.0f} s wall; load average (1, 5, 15 min) "
        f"{_loads(load['before'])} before, {_loads(load['after'])} after (other jobs on "
        f"the machine inflate the seconds, not the steps). Plots: {plots['tokens']}, "
        f"{plots['seconds']}"
    )
    write_summary(
        out / "summary.json",
        {
            "quick": ns.quick,
            "configs": {k: str(v) for k, v in paths.items()},
            "overrides": ns.set,
            "T_seconds": t_eq,
            "results": res,
            "macs_per_token": macs,
            "parameters": params,
            **verdict,
            "load_average": load,
            "wall_seconds": total_wall,
        },
    )
    args_typed = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m memstore.bench.facts", *args_typed])
    record_result(ns, command, res, params, macs, verdict, t_eq)
    return 0


def record_result(
    ns, command: str, res: dict, params: dict, macs: dict, verdict: dict, t_eq: float
) -> None:
    """From a clone, also write the figures to benchmarks/results/ (the docs' data).
    A run with ``--set`` overrides measures other configs than the page describes."""
    if ns.set:
        return
    try:
        from benchmarks._results import write_result
    except ImportError:  # an installed package: no benchmarks folder
        return
    figures = {}
    for name in MODELS:
        r, p, mark = res[name], params[name], res[name]["to_recall_mark"]
        figures[name] = {
            "params (dense + values)": f"{p['dense']:,} + {p['values']:,}",
            "MACs/token": macs[name]["total"],
            "train s": r["seconds"],
            "ms/step": r["step_ms"],
            "recall": r["recall"],
            "NLL": r["nll"],
            "recall @ T": r["recall_at_T"],
            f"steps to {RECALL_MARK}": "not reached" if mark is None else mark["step"],
            f"s to {RECALL_MARK}": "not reached" if mark is None else mark["seconds"],
        }
    write_result(
        "facts_quick" if ns.quick else "facts",
        figures,
        command,
        title=f"Facts experiment ({'quick' if ns.quick else 'full'} form)",
        notes=(
            f"T = {t_eq:.0f} s. Memory / dense recall: {verdict['ratio_equal_tokens']:.2f}× "
            f"at equal tokens, {verdict['ratio_equal_time']:.2f}× at equal time."
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
