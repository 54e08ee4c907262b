"""Training-step benchmark: what the store's transport costs a data-parallel step.

Runs ``trainer.train`` (2 Ray workers, gloo) for a few hundred steps of the --quick
facts configs, without evaluation or checkpoints, in five settings:

* **dense**: ``facts-small-dense.yaml``, the same-FLOPs dense model (no store): the
  baseline;
* **memory**: ``facts-small-memory.yaml`` as shipped, a 2-shard store whose lookups and
  pushes use the TCP data channel and whose shards apply each step on its last push
  (PLAIN: the shards listen on loopback);
* **memory, CURVE**: the same with ``store.data_encrypt: true``, the channel encrypted
  as it is by default wherever it leaves the host: what CURVE costs a step;
* **memory, separate step**: the same with ``store.step_on_push: false`` (after the
  pushes, rank 0 calls ``table.step(s)`` and the ranks wait at a barrier: one more
  blocking round per step);
* **memory, all over Ray**: ``store.data_channel: ray`` and the separate step, i.e.
  every store call an actor call.

Each setting is one ``python -m memstore.trainer.train`` process; the settings (all, or
those named by ``--settings``) run in turn and the whole set ``--passes`` times, so that
drift of the machine hits all of them. The step time of a run is the median of its
per-step training seconds (metrics.jsonl) after 20 warm-up steps; a setting's figure is
the median over passes. Prints one markdown table: ms per step and the ratio to the
dense step (to the first setting run when dense is not among them).

With ``--trees BASE CAND`` the dense and shipped-memory settings run from two source
trees instead (e.g. a ``git worktree`` of an older commit and this one), interleaved in
every pass, and the table compares the trees' steps:

    python -m benchmarks.train_step [--steps 200] [--passes 2] [--trees BASE CAND]
        [--settings dense plain curve ray ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from benchmarks._results import command_line, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 20

SETTINGS = {
    "dense (baseline)": ("facts-small-dense.yaml", []),
    "memory: data channel, step on last push": ("facts-small-memory.yaml", []),
    "memory: data channel with CURVE, step on last push": (
        "facts-small-memory.yaml",
        ["store.data_encrypt=true"],
    ),
    "memory: data channel, separate step": (
        "facts-small-memory.yaml",
        ["store.step_on_push=false"],
    ),
    "memory: all calls over Ray, separate step": (
        "facts-small-memory.yaml",
        ["store.step_on_push=false", "store.data_channel=ray"],
    ),
}
TREE_SETTINGS = ("dense (baseline)", "memory: data channel, step on last push")
# --settings names: the first word that tells each setting apart
SHORT_NAMES = dict(zip(["dense", "plain", "curve", "separate", "ray"], SETTINGS, strict=True))


def step_ms(
    config: str, overrides: list[str], steps: int, run_dir: Path, root: Path = ROOT
) -> float:
    """Median training ms per step of one trainer process, run from the source tree
    ``root`` (its packages come first on the path of the trainer and its Ray workers)."""
    cmd = [
        sys.executable,
        "-m",
        "memstore.trainer.train",
        "--config",
        str(root / "memstore" / "trainer" / "configs" / config),
        *sum(
            (
                ["--set", o]
                for o in [
                    f"steps={steps}",
                    "eval_every=0",
                    "checkpoint_every=0",
                    "progress=false",
                    f"run_dir={run_dir}",
                    *overrides,
                ]
            ),
            [],
        ),
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]
    return 1e3 * statistics.median(seconds[WARMUP_STEPS:])


def _measure(runs: list[tuple[str, Path]], passes: int, steps: int) -> dict:
    """Median ms per step of each (setting, tree) over ``passes``, interleaved."""
    samples: dict[tuple[str, Path], list[float]] = {run: [] for run in runs}
    with (
        tempfile.TemporaryDirectory() as tmp,
        tqdm(total=passes * len(runs), desc="train_step", unit="run") as bar,
    ):
        for p in range(passes):
            for i, (name, root) in enumerate(runs):
                bar.set_postfix_str(name)
                config, overrides = SETTINGS[name]
                samples[(name, root)].append(
                    step_ms(config, overrides, steps, Path(tmp) / f"{p}-{i}", root)
                )
                bar.update()
    return samples


def _print_settings(samples: dict) -> dict:
    """Print the settings' table and return it as {setting: {column: value}}."""
    base = ("dense (baseline)", ROOT)
    dense = statistics.median(samples[base] if base in samples else next(iter(samples.values())))
    print(
        "\n| setting (2 Ray workers, batch 256; memory: 2-shard store) | ms / step "
        "(median over passes) | runs | vs dense step (or the first setting) |"
    )
    print("|---|---:|---|---:|")
    figures = {}
    for (name, _), runs in samples.items():
        value = statistics.median(runs)
        print(
            f"| {name} | {value:.1f} | {', '.join(f'{v:.1f}' for v in runs)} "
            f"| {value / dense:.2f}× |"
        )
        figures[name] = {
            "ms / step": value,
            "runs (ms / step)": ", ".join(f"{v:.1f}" for v in runs),
            "vs dense": value / dense,
        }
    return figures


def _print_trees(samples: dict, base: Path, cand: Path) -> None:
    ms = {key: statistics.median(runs) for key, runs in samples.items()}
    print(
        f"\n| setting (2 Ray workers, batch 256) | {base} ms / step | {cand} ms / step "
        "| cand / base | memory / dense, base | memory / dense, cand |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    dense, memory = TREE_SETTINGS
    for name in TREE_SETTINGS:
        b, c = ms[(name, base)], ms[(name, cand)]
        print(
            f"| {name} | {b:.1f} | {c:.1f} | {c / b:.2f}× "
            f"| {ms[(memory, base)] / ms[(dense, base)]:.2f}× "
            f"| {ms[(memory, cand)] / ms[(dense, cand)]:.2f}× |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--passes", type=int, default=2, help="times each setting runs")
    parser.add_argument(
        "--trees",
        nargs=2,
        type=Path,
        metavar=("BASE", "CAND"),
        help="compare two source trees on the dense and memory settings",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SHORT_NAMES),
        help="run only these settings (default: all)",
    )
    ns = parser.parse_args(argv)
    if ns.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must exceed {WARMUP_STEPS + 1}")
    trees = [t.resolve() for t in ns.trees] if ns.trees else None
    runs = (
        [(name, tree) for name in TREE_SETTINGS for tree in trees]
        if trees
        else [(SHORT_NAMES[n] if ns.settings else n, ROOT) for n in ns.settings or SETTINGS]
    )
    start, load = time.perf_counter(), os.getloadavg()[0]
    samples = _measure(runs, ns.passes, ns.steps)
    print(
        f"\n{os.cpu_count()} CPU threads; 1-min load average {load:.1f} at the start; "
        f"{ns.passes} passes of {ns.steps} steps, {time.perf_counter() - start:.0f} s"
    )
    print(f"command: python -m benchmarks.train_step {' '.join(sys.argv[1:])}".rstrip())
    if trees:
        # Two source trees given on the command line: not a figure of this tree.
        _print_trees(samples, *trees)
        return 0
    figures = _print_settings(samples)
    if "dense (baseline)" not in figures or len(figures) < 2:
        print("no dense baseline beside a memory setting: not written to benchmarks/results")
        return 0
    write_result(
        "train_step",
        figures,
        command_line("benchmarks.train_step"),
        title="Training step: memory against dense",
        notes=(
            f"The quick facts configs (2 Ray Train workers, batch 256, 2-shard store); "
            f"median step after {WARMUP_STEPS} warm-up steps of {ns.steps}, median of "
            f"{ns.passes} passes."
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
