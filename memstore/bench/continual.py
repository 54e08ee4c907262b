"""The continual-learning experiment: teach a trained memory-layer model new facts with
four fine-tuning methods, and measure what each learns and what it forgets.

One model is pretrained in-process (``workers: 0``) on facts mixed with byte text
(``memstore/trainer/configs/continual[-small]-pretrain.yaml``, ``data.kind: mixed``):
half of each batch is windows of a text corpus whose last 5% is held out, half rows of
the first set of facts; a share of the facts is held apart as the second set. Its
checkpoint keeps the value table's row statistics as the snapshot ``pretrain``. Then,
from that checkpoint, each method trains on the second set alone
(``data.train_facts: second``, ``data.text_fraction: 0``) for the same number of steps,
once per learning rate of its sweep (``trainer.finetune``):

* **full**: every dense parameter at ``lr`` and every value row read at 10 × lr (the
  pretraining's ratio of value_lr to lr);
* **lora**: peft's LoRA adapters on the attention and FFN projections at ``lr``;
  everything else frozen, the values too;
* **memory**: every value row a step reads, at ``value_lr``; dense frozen;
* **sparse_memory**: the ``top_t`` rows of each step by TF-IDF of its accesses against
  the ``pretrain`` statistics, at ``value_lr``; dense frozen.

Every evaluation measures learning (recall of the new facts) and forgetting (recall of
the first facts; bits per byte of the held-out text). The learning rate reported for a
method is the one of its sweep that reaches 0.9 new-fact recall with the least
first-fact recall lost on the way (none reaching 0.9: the highest new-fact recall), and
methods are compared at equal learning: their forgetting where their new-fact recall
first reaches 0.9 (linear between evaluations). Targets (full form), after Lin et al.
2025 ("Continual Learning via Sparse Memory Finetuning"): sparse_memory reaches >= 0.9
new-fact recall while losing at most a tenth of what full fine-tuning loses and at most
half of what LoRA loses on both probes, and less held-out text than ``memory``.
Writes ``forgetting_vs_learning.png`` (one point per evaluation), ``summary.json``
under ``--out`` (default ``runs/continual`` or
``runs/continual-quick``) and prints a markdown table beside Lin et al.'s
NaturalQuestions F1 drops.

    python -m memstore.bench.continual [--quick] [--corpus FILE] [--out DIR]

Run it as a module from the repository root. The figures count steps, not seconds:
the load of the machine does not change them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from memstore.bench._experiment import curve, text_experiment_parser, write_summary
from memstore.trainer import configs as builtin
from memstore.trainer.train import load_config, train

METHODS = ("full", "lora", "memory", "sparse_memory")
EVAL_KEYS = ("recall_first", "recall_second", "val_bits_per_byte")
TARGET_NEW = 0.9  # new-fact recall every method is compared at
TARGET_VS_FULL, TARGET_VS_LORA = 0.1, 0.5  # sparse_memory's loss / theirs, at most
# NaturalQuestions F1 drop after learning new facts (Lin et al. 2025, Fig. 1).
LIN_ET_AL = {"full": 0.89, "lora": 0.71, "sparse_memory": 0.11}
PLOT = "forgetting_vs_learning.png"


def form(quick: bool) -> dict:
    """The pretraining config, the fine-tuning runs' length and rows per step, and each
    method's learning rates (the settings that change with them)."""
    if quick:
        return {
            "config": "continual-small-pretrain",
            "steps": 100,
            "eval_every": 10,
            "top_t": 2048,
            "sweep": {
                "full": [1e-4, 3e-4],
                "lora": [3e-3, 1e-2],
                "memory": [3e-3, 1e-2],
                "sparse_memory": [1e-2, 3e-2],
            },
        }
    return {
        "config": "continual-pretrain",
        "steps": 200,
        "eval_every": 20,
        "top_t": 2048,
        "sweep": {
            "full": [3e-5, 1e-4, 3e-4],
            "lora": [1e-3, 3e-3, 1e-2],
            "memory": [1e-3, 3e-3, 1e-2],
            "sparse_memory": [3e-3, 1e-2, 3e-2],
        },
    }


def lr_overrides(method: str, lr: float) -> list[str]:
    if method == "full":
        return [f"lr={lr}", f"value_lr={10 * lr}"]
    if method == "lora":
        return [f"lr={lr}"]
    return [f"value_lr={lr}"]


def finetune_overrides(f: dict, pretrain_dir: Path, method: str, lr: float) -> list[str]:
    """A fine-tuning run of ``method`` at ``lr`` from the pretraining checkpoint: the
    second set of facts alone, a constant value lr, the dense lr's cosine to 0."""
    sparse = [f"finetune.top_t={f['top_t']}", "finetune.background=pretrain"]
    return [
        f"steps={f['steps']}",
        f"eval_every={f['eval_every']}",
        "checkpoint_every=0",
        "stats_snapshot=null",
        "warmup=0",
        "min_lr=0",
        "data.train_facts=second",
        "data.text_fraction=0",
        f"finetune.method={method}",
        f"finetune.from={pretrain_dir}",
        *(sparse if method == "sparse_memory" else []),
        *lr_overrides(method, lr),
    ]


def run_all(f: dict, out: Path, overrides: list[str]) -> tuple[dict, dict]:
    """Pretrain, then every method at every lr of its sweep; (the pretrained model's
    evaluation, {method: {lr: evaluation curve}})."""
    config = builtin.path(f["config"])
    runs = [(m, lr) for m in METHODS for lr in f["sweep"][m]]
    bar = tqdm(total=1 + len(runs), desc="continual", unit="run")
    pretrain_dir = out / "pretrain"
    common = ["progress=false", *overrides]
    base = train(load_config(config, [*common, f"run_dir={pretrain_dir}"]), overwrite=True)
    bar.update(1)
    curves: dict[str, dict] = {m: {} for m in METHODS}
    for method, lr in runs:
        bar.set_postfix(method=method, lr=lr)
        run_dir = out / f"{method}-lr{lr:g}"
        ft = finetune_overrides(f, pretrain_dir, method, lr)
        train(load_config(config, [*common, *ft, f"run_dir={run_dir}"]), overwrite=True)
        curves[method][lr] = curve(run_dir, EVAL_KEYS)
        bar.update(1)
    bar.close()
    return base["eval"], curves


def outcome(base: dict, c: dict) -> dict:
    """A run's end and its points: new-fact recall, first-fact recall lost and
    held-out bits per byte gained, from the pretrained model (step 0) on."""
    new = [base["recall_second"], *c["recall_second"]]
    lost = [0.0, *(base["recall_first"] - c["recall_first"])]
    bpb = [0.0, *(c["val_bits_per_byte"] - base["val_bits_per_byte"])]
    return {
        **at_target(new, lost, bpb),
        "new_recall": float(new[-1]),
        "first_recall": float(c["recall_first"][-1]),
        "first_lost": float(lost[-1]),
        "first_lost_rel": float(lost[-1] / base["recall_first"]),
        "val_bpb": float(c["val_bits_per_byte"][-1]),
        "val_bpb_gained": float(bpb[-1]),
        "val_bpb_gained_rel": float(bpb[-1] / base["val_bits_per_byte"]),
        "points": {"step": [0, *c["step"].tolist()], "new": new, "lost": lost, "bpb": bpb},
    }


def at_target(new: list, lost: list, bpb: list) -> dict:
    """First-fact recall lost and bits per byte gained where the run's new-fact recall
    first reaches TARGET_NEW (linear between the two evaluations around it): the
    forgetting at equal learning. None where it never does."""
    for i in range(1, len(new)):
        if new[i] >= TARGET_NEW > new[i - 1]:
            share = (TARGET_NEW - new[i - 1]) / (new[i] - new[i - 1])
            return {
                "lost_at_target": float(lost[i - 1] + share * (lost[i] - lost[i - 1])),
                "bpb_at_target": float(bpb[i - 1] + share * (bpb[i] - bpb[i - 1])),
            }
    return {"lost_at_target": None, "bpb_at_target": None}


def forgetting(r: dict) -> tuple[float, float]:
    """(first-fact recall lost, bits per byte gained) at TARGET_NEW new-fact recall, or
    at the run's end when it never reaches it."""
    if r["lost_at_target"] is None:
        return r["first_lost"], r["val_bpb_gained"]
    return r["lost_at_target"], r["bpb_at_target"]


def choose(runs: dict[float, dict]) -> float:
    """The lr whose run reaches TARGET_NEW new-fact recall with the least first-fact
    recall lost on the way there; none reaching it: the one of highest new-fact recall."""
    reach = [lr for lr, r in runs.items() if r["lost_at_target"] is not None]
    if reach:
        return min(reach, key=lambda lr: (runs[lr]["lost_at_target"], lr))
    return max(runs, key=lambda lr: (runs[lr]["new_recall"], -lr))


def at_most(mine: float, theirs: float, share: float) -> dict:
    """mine <= share × theirs (a loss: 0 or less counts as none)."""
    mine, theirs = max(mine, 0.0), max(theirs, 0.0)
    return {
        "ratio": mine / theirs if theirs > 0 else None,
        "target": share,
        "met": mine <= share * theirs,
    }


def verdicts(chosen: dict) -> dict:
    """sparse_memory's targets, each method's forgetting taken at equal learning
    (:func:`forgetting`)."""
    s = chosen["sparse_memory"]
    out = {"sparse_new_recall": {"value": s["new_recall"], "met": s["new_recall"] >= TARGET_NEW}}
    (s_facts, s_text) = forgetting(s)
    for other, share in (("full", TARGET_VS_FULL), ("lora", TARGET_VS_LORA)):
        o_facts, o_text = forgetting(chosen[other])
        out[f"facts_vs_{other}"] = at_most(s_facts, o_facts, share)
        out[f"text_vs_{other}"] = at_most(s_text, o_text, share)
    m_text = forgetting(chosen["memory"])[1]
    out["text_vs_memory"] = {"sparse": s_text, "memory": m_text, "met": s_text < m_text}
    out["all_met"] = all(v["met"] for v in out.values() if isinstance(v, dict))
    return out


def plot(results: dict, chosen_lr: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    probes = (("lost", "first facts' recall lost"), ("bpb", "held-out text: bits per byte gained"))
    for ax, (key, label) in zip(axes, probes):
        for method in METHODS:
            for lr, r in results[method].items():
                best = lr == chosen_lr[method]
                p = r["points"]
                ax.plot(
                    p["new"],
                    p[key],
                    "o-" if best else ":",
                    ms=3,
                    lw=1.5 if best else 0.8,
                    alpha=1.0 if best else 0.4,
                    label=f"{method}, lr {lr:g}" if best else None,
                    color=f"C{METHODS.index(method)}",
                )
        ax.set_xlabel("new facts' recall")
        ax.set_ylabel(label)
        ax.axvline(TARGET_NEW, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (dotted: the other lrs of each sweep)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(base: dict, results: dict, chosen_lr: dict) -> str:
    rows = [
        "| method | lr (sweep) | new facts' recall | first facts' recall (lost) "
        f"| held-out bpb (gained) | at {TARGET_NEW} new: first lost, bpb gained "
        "| Lin et al.: NQ F1 drop |",
        "|---|---|---|---|---|---|---|",
        f"| pretrained | | {base['recall_second']:.3f} | {base['recall_first']:.3f} "
        f"| {base['val_bits_per_byte']:.3f} | | |",
    ]
    for m in METHODS:
        lr = chosen_lr[m]
        r = results[m][lr]
        sweep = ", ".join(f"{x:g}" for x in results[m])
        lin = f"{LIN_ET_AL[m]:.0%}" if m in LIN_ET_AL else "—"
        equal = (
            "not reached"
            if r["lost_at_target"] is None
            else f"{r['lost_at_target']:.3f}, {r['bpb_at_target']:+.4f}"
        )
        rows.append(
            f"| {m} | {lr:g} ({sweep}) | {r['new_recall']:.3f} | {r['first_recall']:.3f} "
            f"({r['first_lost_rel']:+.1%}) | {r['val_bpb']:.3f} ({r['val_bpb_gained_rel']:+.1%})"
            f" | {equal} | {lin} |"
        )
    return "\n".join(rows)


def sweep_table(results: dict) -> str:
    rows = [
        "| method | lr | new recall | first recall lost | bpb gained |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        for lr, r in results[m].items():
            rows.append(
                f"| {m} | {lr:g} | {r['new_recall']:.3f} | {r['first_lost']:.3f} "
                f"| {r['val_bpb_gained']:+.4f} |"
            )
    return "\n".join(rows)


def report(base: dict, results: dict, chosen_lr: dict, v: dict) -> None:
    print("\n## Continual learning: each method at its chosen lr\n")
    print(table(base, results, chosen_lr))
    print("\n### The learning-rate sweep (end of each run)\n")
    print(sweep_table(results))
    print("\n### Targets (sparse_memory)\n")
    for name, verdict in v.items():
        if isinstance(verdict, dict):
            shown = {k: x for k, x in verdict.items() if k != "met"}
            print(f"- {name}: {'met' if verdict['met'] else 'NOT met'} {shown}")
    print(f"\nAll targets met: {v['all_met']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = text_experiment_parser(
        "python -m memstore.bench.continual",
        __doc__,
        "the small version (minutes)",
        "runs/continual[-quick]",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from memstore.bench.text import stdlib_corpus

    logging.basicConfig(level=logging.WARNING)
    ns = parse_args(argv)
    out = Path(ns.out or Path("runs") / ("continual-quick" if ns.quick else "continual")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = (
        Path(ns.corpus).resolve()
        if ns.corpus
        else stdlib_corpus(Path("runs") / "text-corpus" / "stdlib.txt").resolve()
    )
    f = form(ns.quick)
    started = time.perf_counter()
    base, curves = run_all(f, out, [f"data.path={corpus}", *ns.set])
    results = {m: {lr: outcome(base, c) for lr, c in curves[m].items()} for m in METHODS}
    chosen_lr = {m: choose(results[m]) for m in METHODS}
    v = verdicts({m: results[m][chosen_lr[m]] for m in METHODS})
    title = f"{f['config']}: {f['steps']} fine-tuning steps, sparse_memory top_t {f['top_t']}"
    plot(results, chosen_lr, out / PLOT, title)
    report(base, results, chosen_lr, v)
    wall = time.perf_counter() - started
    print(f"\nAll runs: {wall:.0f} s wall. Plot: {out / PLOT}")
    summary = {
        "quick": ns.quick,
        "corpus": str(corpus),
        "form": f,
        "overrides": ns.set,
        "pretrained": base,
        "chosen_lr": chosen_lr,
        "results": {m: {f"{lr:g}": r for lr, r in rs.items()} for m, rs in results.items()},
        "verdicts": v,
        "wall_seconds": wall,
    }
    write_summary(out / "summary.json", summary)
    command = " ".join(
        ["python -m memstore.bench.continual", *(sys.argv[1:] if argv is None else argv)]
    )
    record_result(ns, command, summary, out / PLOT)
    return 0


def record_result(ns, command: str, summary: dict, plot_path: Path) -> None:
    """From a clone, also write the figures to benchmarks/results/ (the docs' data) and
    the plot beside them. A run with ``--set``, another corpus or another ``--out``
    measures other runs than the page describes."""
    if ns.set or ns.corpus or ns.out:
        return
    try:
        from benchmarks._results import RESULTS, write_result
    except ImportError:  # an installed package: no benchmarks folder
        return
    area = "continual_quick" if ns.quick else "continual"
    figures = {}
    for m, lr in summary["chosen_lr"].items():
        r = summary["results"][m][f"{lr:g}"]
        figures[m] = {
            "lr": lr,
            "new recall": r["new_recall"],
            "first recall": r["first_recall"],
            "first lost %": 100 * r["first_lost_rel"],
            "val bpb": r["val_bpb"],
            "val bpb gained %": 100 * r["val_bpb_gained_rel"],
            f"first lost @ {TARGET_NEW} new": r["lost_at_target"],
            f"bpb gained @ {TARGET_NEW} new": r["bpb_at_target"],
        }
    v = summary["verdicts"]
    notes = (
        f"Pretrained: first-fact recall {summary['pretrained']['recall_first']:.3f}, held-out "
        f"{summary['pretrained']['val_bits_per_byte']:.3f} bits per byte. Targets met: "
        f"{v['all_met']}. Lin et al. 2025 (NaturalQuestions F1 drop): sparse memory 11%, "
        "full 89%, LoRA 71%."
    )
    title = f"Continual learning ({'quick' if ns.quick else 'full'} form)"
    write_result(area, figures, command, title=title, notes=notes)
    shutil.copyfile(plot_path, RESULTS / f"{area}_{plot_path.name}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
