"""Training-step benchmark: what the store's transport costs a data-parallel step.

Runs ``trainer.train`` (2 Ray workers, gloo) for a few hundred steps of the --quick
facts configs, without evaluation or checkpoints, in four settings:

* **dense**: ``facts-small-dense.yaml``, the same-FLOPs dense model (no store): the
  baseline;
* **memory**: ``facts-small-memory.yaml`` as shipped, a 2-shard store whose lookups and
  pushes use the TCP data channel and whose shards apply each step on its last push;
* **memory, driver step**: the same with ``store.step_on_push: false`` (the driver
  calls ``table.step(s)`` after the workers: one more blocking round per step);
* **memory, all over Ray**: ``store.data_channel: ray`` and the driver step, i.e. every
  store call an actor call, as before the data channel existed.

Each setting is one ``python -m trainer.train`` process; the settings run in turn and
the whole set ``--passes`` times, so that drift of the machine hits all of them. The
step time of a run is the median of its per-step training seconds (metrics.jsonl)
after 20 warm-up steps; a setting's figure is the median over passes. Prints one
markdown table: ms per step and the ratio to the dense step.

    python -m benchmarks.train_step [--steps 200] [--passes 2]
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

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 20

SETTINGS = {
    "dense (baseline)": ("facts-small-dense.yaml", []),
    "memory: data channel, step on last push": ("facts-small-memory.yaml", []),
    "memory: data channel, driver step": ("facts-small-memory.yaml",
                                          ["store.step_on_push=false"]),
    "memory: all calls over Ray, driver step": ("facts-small-memory.yaml",
                                                ["store.step_on_push=false",
                                                 "store.data_channel=ray"]),
}


def step_ms(config: str, overrides: list[str], steps: int, run_dir: Path,
            root: Path = ROOT) -> float:
    """Median training ms per step of one trainer process, run from the source tree
    ``root`` (its packages come first on the path of the trainer and its Ray workers)."""
    cmd = [sys.executable, "-m", "trainer.train", "--config",
           str(root / "trainer" / "configs" / config),
           *sum((["--set", o] for o in [f"steps={steps}", "eval_every=0",
                                         "checkpoint_every=0", "progress=false",
                                         f"run_dir={run_dir}", *overrides]), [])]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]
    return 1e3 * statistics.median(seconds[WARMUP_STEPS:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--passes", type=int, default=2, help="times each setting runs")
    ns = parser.parse_args(argv)
    if ns.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must exceed {WARMUP_STEPS + 1}")
    start, load = time.perf_counter(), os.getloadavg()[0]
    samples: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=ns.passes * len(SETTINGS), desc="train_step", unit="run") as bar:
        for p in range(ns.passes):
            for i, (name, (config, overrides)) in enumerate(SETTINGS.items()):
                bar.set_postfix_str(name)
                samples[name].append(step_ms(config, overrides, ns.steps,
                                             Path(tmp) / f"{p}-{i}"))
                bar.update()
    ms = {name: statistics.median(v) for name, v in samples.items()}
    dense = ms["dense (baseline)"]
    print(f"\n{os.cpu_count()} CPU threads; 1-min load average {load:.1f} at the start; "
          f"{ns.passes} passes of {ns.steps} steps, {time.perf_counter() - start:.0f} s")
    print(f"command: python -m benchmarks.train_step {' '.join(sys.argv[1:])}".rstrip())
    print("\n| setting (2 Ray workers, batch 256; memory: 2-shard store) | ms / step "
          "(median over passes) | runs | vs dense step |")
    print("|---|---:|---|---:|")
    for name, value in ms.items():
        runs = ", ".join(f"{v:.1f}" for v in samples[name])
        print(f"| {name} | {value:.1f} | {runs} | {value / dense:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
