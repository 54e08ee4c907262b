"""The facts experiment: a memory-layer model against its dense baseline of equal FLOPs.

Both models are trained by ``trainer.train`` (its CLI, one subprocess per run, one after
the other) on the same synthetic facts corpus (E entities × A attributes, values drawn
from V; trainer.data.FactsCorpus), with the same batches, schedule and number of steps,
hence the same number of tokens:

* **memory**: ``trainer/configs/facts-memory.yaml``, a small transformer whose last FFN is
  a Memory+ layer whose value rows live in the store (2 shards, 2 data-parallel Ray
  workers);
* **dense**: ``trainer/configs/facts-dense.yaml``, the same model with
  ``dense_equivalent: true``: the memory layer becomes a SwiGLU FFN of the same
  multiply-adds per token (trainer.model.dense_equivalent), so both models have the same
  per-token FLOPs; the memory model has more parameters, not more compute.

``--quick`` runs ``facts-small-memory.yaml`` / ``facts-small-dense.yaml`` instead: a
smaller corpus and fewer steps, the same models and the same 2 workers + 2 shards,
a few minutes on 2 cores.

What is reported (from each run's ``metrics.jsonl``):

* exact-match **recall** over every fact (argmax over the V value tokens) and the
  answer **NLL** (nats, full softmax), at every evaluation, against tokens seen and
  against **seconds** = the trainer's training time (the steps only: without Ray
  start-up, evaluations and checkpoints; ``wall`` in the table is the whole process);
* **at equal tokens**: the final evaluation of each run (same tokens by construction);
* **at equal time**: T = the shorter of the two runs' training seconds; each model's
  recall and NLL at T, linearly interpolated between its evaluations in seconds
  (the run that finished at T contributes its final evaluation);
* ratios memory / dense of recall at equal tokens and at equal time.

Targets of the issue (full experiment, within 20 minutes on 2 CPU cores): memory recall
>= 2x dense at equal tokens and >= 1.5x at equal time, with the dense model short of
full recall. Writes ``recall_vs_tokens.png``, ``recall_vs_seconds.png`` (recall on top,
NLL below) and ``summary.json`` under ``--out`` (default ``runs/facts`` or
``runs/facts-quick``) and prints a markdown table.

    python -m benchmarks.facts [--quick] [--out DIR] [--set KEY=VALUE ...]

``--set`` overrides go to both runs (e.g. ``--set steps=200``). Run it as a module from
the repository root.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from trainer.data import FactsCorpus  # noqa: E402
from trainer.model import ffn_slot_macs  # noqa: E402
from trainer.train import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "trainer" / "configs"
TARGET_TOKENS = 2.0  # memory recall / dense recall at equal tokens
TARGET_TIME = 1.5  # ... at equal training time
FULL_RECALL = 0.99  # "the dense model does not reach full recall"


def configs(quick: bool) -> dict[str, Path]:
    prefix = "facts-small-" if quick else "facts-"
    return {"dense": CONFIGS / f"{prefix}dense.yaml", "memory": CONFIGS / f"{prefix}memory.yaml"}


def check_fair(args: dict) -> None:
    """Same data, batches, schedule and steps; the dense side is the dense equivalent
    of the memory side's model."""
    d, m = args["dense"].to_dict(), args["memory"].to_dict()
    if not args["dense"].dense_equivalent or args["memory"].dense_equivalent:
        raise SystemExit("the dense config needs dense_equivalent: true, the memory one not")
    same = ("model", "data", "steps", "batch_size", "lr", "warmup", "min_lr", "weight_decay",
            "grad_clip", "seed", "workers")
    diff = [k for k in same if d[k] != m[k]]
    if diff:
        raise SystemExit(f"dense and memory configs differ in {diff}: not a fair comparison")


def per_token_macs(margs) -> dict:
    """Multiply-adds per token of the forward pass (attention context mixing at this
    sequence length of 2 is negligible and the same on both sides)."""
    attn = 4 * margs.dim * margs.dim
    slots = sum(ffn_slot_macs(margs, i) for i in range(margs.n_layers))
    out = margs.dim * margs.vocab_size
    return {"total": margs.n_layers * attn + slots + out, "ffn_slots": slots}


def parameters(margs) -> dict:
    from trainer.model import Transformer, table_specs

    model = Transformer(margs)
    dense = sum(p.numel() for p in model.parameters())
    values = sum(r * c for r, c in table_specs(margs).values())
    return {"dense": dense, "values": values}


def run(name: str, config: Path, run_dir: Path, overrides: list[str]) -> float:
    # A benchmark rerun starts each model afresh in its run directory.
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(config), "--overwrite",
           "--set", f"run_dir={run_dir}", *sum((["--set", o] for o in overrides), [])]
    print(f"\n## {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def curve(run_dir: Path, keys: tuple[str, ...] = ("recall", "nll")) -> dict[str, np.ndarray]:
    """A run's evaluations from its metrics.jsonl: step, tokens, seconds and the
    ``eval`` entries ``keys``, one value per evaluation; and the run's totals."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "eval" in r]
    return {"step": np.array([r["step"] for r in evals]),
            "tokens": np.array([r["tokens"] for r in evals], dtype=float),
            "seconds": np.array([r["seconds"] for r in evals]),
            **{k: np.array([r["eval"][k] for r in evals]) for k in keys},
            "total_seconds": rows[-1]["seconds"], "total_tokens": rows[-1]["tokens"]}


def at_seconds(c: dict, t: float, key: str) -> float:
    """c[key] at training time t, linear between evaluations (t within the run)."""
    return float(np.interp(t, c["seconds"], c[key]))


def plot(curves: dict, x: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, c in curves.items():
        top.plot(c[x], c["recall"], "o-", ms=3, label=name)
        bottom.plot(c[x], c["nll"], "o-", ms=3, label=name)
    top.set_ylabel("exact-match recall")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    bottom.set_ylabel("answer NLL (nats)")
    bottom.grid(alpha=0.3)
    bottom.set_xlabel({"tokens": "tokens seen", "seconds": "training seconds "
                       "(steps only, without start-up and evaluation)"}[x])
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(a, margs) -> str:
    d = a.data
    if margs.memory_layers:
        layer = (f"layers {margs.memory_layers}: Memory+ {margs.mem_n_keys}² = "
                 f"{margs.mem_n_keys ** 2:,} rows × {margs.mem_value_dim}, "
                 f"{margs.mem_heads} heads × k={margs.mem_k}, key_dim {margs.mem_key_dim}; "
                 f"store {a.store.shards} shards, {a.store.mode}")
    else:
        layer = f"SwiGLU widths {margs.layer_ffn_hidden}"
    return (f"dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads, {layer}; "
            f"facts {d.entities}×{d.attributes} (V={d.values}); {a.steps} steps × "
            f"batch {a.batch_size}, lr {a.lr:g}" + (f", value_lr {a.value_lr:g}"
                                                    if margs.memory_layers else "")
            + f", {a.workers} workers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.facts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the small version (facts-small-*.yaml), a few minutes")
    parser.add_argument("--out", help="output folder (default runs/facts[-quick])")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of both runs")
    ns = parser.parse_args(argv)
    out = Path(ns.out or ROOT / "runs" / ("facts-quick" if ns.quick else "facts")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = configs(ns.quick)
    args = {name: load_config(p, ns.set) for name, p in paths.items()}
    check_fair(args)
    d = args["memory"].data
    vocab = FactsCorpus(d.entities, d.attributes, d.values, seed=d.seed).vocab_size
    margs = {name: a.model_args(vocab) for name, a in args.items()}
    macs = {name: per_token_macs(m) for name, m in margs.items()}
    params = {name: parameters(m) for name, m in margs.items()}
    if macs["dense"]["ffn_slots"] != macs["memory"]["ffn_slots"]:
        rel = abs(macs["dense"]["ffn_slots"] / macs["memory"]["ffn_slots"] - 1)
        if rel > 0.01:
            raise SystemExit(f"per-token FFN multiply-adds differ by {rel:.1%}")

    started = time.perf_counter()
    wall, curves = {}, {}
    for name in ("dense", "memory"):
        run_dir = out / name
        wall[name] = run(name, paths[name], run_dir, ns.set)
        curves[name] = curve(run_dir)
    total_wall = time.perf_counter() - started
    dense, memory = curves["dense"], curves["memory"]
    if dense["total_tokens"] != memory["total_tokens"]:
        raise SystemExit("the runs saw different numbers of tokens")

    title = (f"facts {d.entities}×{d.attributes} (V={d.values}), "
             f"{args['memory'].steps} steps, W={args['memory'].workers}")
    plots = {x: out / f"recall_vs_{x}.png" for x in ("tokens", "seconds")}
    for x, path in plots.items():
        plot(curves, x, path, title)

    t_eq = min(dense["total_seconds"], memory["total_seconds"])
    shorter = "dense" if dense["total_seconds"] <= memory["total_seconds"] else "memory"
    res = {}
    for name, c in curves.items():
        res[name] = {"recall": float(c["recall"][-1]), "nll": float(c["nll"][-1]),
                     "recall_at_T": at_seconds(c, t_eq, "recall"),
                     "nll_at_T": at_seconds(c, t_eq, "nll"),
                     "seconds": float(c["total_seconds"]), "wall": wall[name],
                     "tokens": int(c["total_tokens"])}
    ratio_tokens = res["memory"]["recall"] / max(res["dense"]["recall"], 1e-12)
    ratio_time = res["memory"]["recall_at_T"] / max(res["dense"]["recall_at_T"], 1e-12)
    met = {"tokens": ratio_tokens >= TARGET_TOKENS, "time": ratio_time >= TARGET_TIME,
           "dense_short_of_full_recall": res["dense"]["recall"] < FULL_RECALL}

    print(f"\n### Facts experiment{' (--quick)' if ns.quick else ''}\n")
    for name in ("dense", "memory"):
        print(f"- **{name}** (`{paths[name].relative_to(ROOT)}`): "
              f"{describe(args[name], margs[name])}")
    print()
    print("| model | params (dense + values) | MACs/token | tokens | train s | wall s "
          "| recall | NLL | recall @ T | NLL @ T |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("dense", "memory"):
        r, p = res[name], params[name]
        print(f"| {name} | {p['dense']:,} + {p['values']:,} | {macs[name]['total']:,} | "
              f"{r['tokens']:,} | {r['seconds']:.0f} | {r['wall']:.0f} | {r['recall']:.4f} | "
              f"{r['nll']:.3f} | {r['recall_at_T']:.4f} | {r['nll_at_T']:.3f} |")
    print(f"\nT = {t_eq:.0f} s, the {shorter} run's training time (the shorter one); "
          "'@ T' values of the other run are interpolated between its evaluations.")
    print(f"Memory / dense recall: **{ratio_tokens:.2f}×** at equal tokens (target "
          f"≥ {TARGET_TOKENS}×: {'met' if met['tokens'] else 'MISSED'}), "
          f"**{ratio_time:.2f}×** at equal time (target ≥ {TARGET_TIME}×: "
          f"{'met' if met['time'] else 'MISSED'}); dense final recall "
          f"{res['dense']['recall']:.4f} ({'short of' if met['dense_short_of_full_recall'] else 'AT'}"
          f" full recall). Both runs: {total_wall:.0f} s wall.")
    print(f"Plots: {plots['tokens']}, {plots['seconds']}")
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump({"quick": ns.quick, "configs": {k: str(v) for k, v in paths.items()},
                   "overrides": ns.set, "T_seconds": t_eq, "results": res,
                   "macs_per_token": macs, "parameters": params,
                   "ratio_equal_tokens": ratio_tokens, "ratio_equal_time": ratio_time,
                   "targets_met": met, "wall_seconds": total_wall}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
