"""What the model-comparison experiments (memstore.bench.facts, memstore.bench.text)
share: the fairness checks, training each model in its own ``trainer.train`` process, and
reading its evaluations back from ``metrics.jsonl``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from memstore.trainer.model import Transformer, engram_macs, ffn_slot_macs, table_specs

MODELS = ("dense", "memory", "pkm")
# The settings every model of a comparison shares: same data, batches, schedule, steps.
SCHEDULE = (
    "data",
    "steps",
    "batch_size",
    "lr",
    "warmup",
    "min_lr",
    "weight_decay",
    "grad_clip",
    "seed",
    "workers",
)


def check_fair(args: dict, dense: str = "dense", model: str = "memory") -> None:
    """Same data, batches, schedule and steps; the ``dense`` side is the dense
    equivalent of the ``model`` side's model."""
    d, m = args[dense].to_dict(), args[model].to_dict()
    if not args[dense].dense_equivalent or args[model].dense_equivalent:
        raise SystemExit(f"the {dense} config needs dense_equivalent: true, the {model} one not")
    diff = [k for k in ("model", *SCHEDULE) if d[k] != m[k]]
    if diff:
        raise SystemExit(f"{dense} and {model} configs differ in {diff}: not a fair comparison")


def model_differences(peer: dict, memory: dict, layer_fields: set[str]) -> list[str]:
    """The ``model.*`` settings in which two configs (``to_dict()``) differ, other than
    ``layer_fields``: those of the memory layer itself, which the peer replaces."""
    p, m = peer["model"], memory["model"]
    return [f"model.{k}" for k in set(p) | set(m) if k not in layer_fields and p.get(k) != m.get(k)]


def per_token_macs(margs) -> dict:
    """Multiply-adds per token of the forward pass, without attention's context mixing
    (the same in every model of a comparison); ``engram``: those of the Engram layers."""
    attn = 4 * margs.dim * margs.dim
    slots = sum(ffn_slot_macs(margs, i) for i in range(margs.n_layers))
    engram = len(margs.engram_layers) * engram_macs(margs)
    out = margs.dim * margs.vocab_size
    return {
        "total": margs.n_layers * attn + slots + engram + out,
        "ffn_slots": slots,
        "engram": engram,
    }


def parameters(margs) -> dict:
    """Dense parameters and value rows × width (memory and Engram tables alike); the
    PKM peer's values are dense parameters of its model but counted as values here."""
    model = Transformer(margs)
    total = sum(p.numel() for p in model.parameters())
    if margs.pkm_peer:
        values = sum(p.numel() for p in model.peer_values())
        return {"dense": total - values, "values": values}
    return {"dense": total, "values": sum(r * c for r, c in table_specs(margs).values())}


def run(name: str, config: Path, run_dir: Path, overrides: list[str]) -> float:
    """Train one model in a subprocess (in the current folder); its wall seconds."""
    # A benchmark rerun starts each model afresh in its run directory.
    cmd = [
        sys.executable,
        "-m",
        "memstore.trainer.train",
        "--config",
        str(config),
        "--overwrite",
        "--set",
        f"run_dir={run_dir}",
        *(arg for o in overrides for arg in ("--set", o)),
    ]
    print(f"\n## {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def curve(run_dir: Path, keys: tuple[str, ...] = ("recall", "nll")) -> dict[str, np.ndarray]:
    """A run's evaluations from its metrics.jsonl: step, tokens, seconds and the
    ``eval`` entries ``keys``, one value per evaluation; the median step in ms; and the
    run's totals."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "eval" in r]
    step_seconds = np.diff([r["seconds"] for r in rows if "seconds" in r])
    return {
        "step": np.array([r["step"] for r in evals], dtype=float),
        "step_ms": 1000 * float(np.median(step_seconds)) if len(step_seconds) else 0.0,
        "tokens": np.array([r["tokens"] for r in evals], dtype=float),
        "seconds": np.array([r["seconds"] for r in evals]),
        **{k: np.array([r["eval"][k] for r in evals]) for k in keys},
        "total_seconds": rows[-1]["seconds"],
        "total_tokens": rows[-1]["tokens"],
    }


def at_seconds(c: dict, t: float, key: str) -> float:
    """c[key] at training time t, linear between evaluations (t within the run)."""
    return float(np.interp(t, c["seconds"], c[key]))


def check_equal_macs(macs: dict, model: str = "memory", dense: str = "dense") -> None:
    """The dense twin's (``dense``) FFN slots cost ``model``'s multiply-adds per token
    of its FFN slots and Engram layers (1%)."""
    d, m = macs[dense], macs[model]
    rel = abs((d["ffn_slots"] + d["engram"]) / (m["ffn_slots"] + m["engram"]) - 1)
    if rel > 0.01:
        raise SystemExit(f"per-token FFN multiply-adds of {dense} and {model} differ by {rel:.1%}")


def train_models(
    paths: dict[str, Path],
    out: Path,
    overrides: list[str],
    keys: tuple[str, ...],
    model_overrides: dict[str, list[str]] | None = None,
) -> tuple[dict[str, float], dict[str, dict]]:
    """Train every model of ``paths`` in turn under ``out/NAME`` (``overrides`` for all,
    then ``model_overrides[NAME]``); their wall seconds and evaluation curves (``curve``
    with ``keys``), checked to have seen the same tokens."""
    wall, curves = {}, {}
    for name, config in paths.items():
        extra = (model_overrides or {}).get(name, [])
        wall[name] = run(name, config, out / name, [*overrides, *extra])
        curves[name] = curve(out / name, keys)
    if len({c["total_tokens"] for c in curves.values()}) != 1:
        raise SystemExit("the runs saw different numbers of tokens")
    return wall, curves


def write_summary(path: Path, summary: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


def text_experiment_parser(prog: str, doc: str, quick_help: str, out_default: str):
    """The arguments every experiment on text shares: --quick, --corpus, --out, --set."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--corpus",
        help="a text file (default: the standard library's sources, written to "
        "runs/text-corpus/stdlib.txt)",
    )
    parser.add_argument("--out", help=f"output folder (default {out_default})")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of every run",
    )
    return parser
