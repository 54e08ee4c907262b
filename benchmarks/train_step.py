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
every pass, and the table compares the trees' steps.

With ``--engram`` it measures the Engram step instead (``text-small-engram.yaml``, one
rank, in this process, so that only the table differs), in four settings: the Engram
table local (a ShardTable in the trainer's process, stepped after each step) or in the
store (2 shards on a local Ray instance, applying each step with its push, as the
trainer makes it for one worker), each with ``model.engram_prefetch`` true (lookups
issued before the forward, for the store a step ahead; pushes issued without waiting)
and false (looked up and pushed in turn). The four run side by side in turns of 10 steps
(so that the drift of a shared machine hits all of them); a setting's figure is the
median of its step times (the replica's step and, for the local table, its table step)
after 20 warm-up steps, without the first step of each turn. ``--passes`` does not
apply. Written to benchmarks/results/train_step_engram.json.

    python -m benchmarks.train_step [--steps 200] [--passes 2] [--trees BASE CAND]
        [--settings dense plain curve ray ...] [--engram]
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


ENGRAM_SETTINGS = {
    "Engram, local table, prefetch": ("local", True),
    "Engram, local table, blocking": ("local", False),
    "Engram, store table (2 shards), prefetch": ("store", True),
    "Engram, store table (2 shards), blocking": ("store", False),
}


ENGRAM_BLOCK = 10  # steps a setting runs in a row before the next setting's turn


class EngramRun:
    """One Engram setting, in this process: a replica over a ``table`` ("local" or
    "store") Engram table, its config text-small-engram with ``steps`` steps."""

    def __init__(self, table: str, prefetch: bool, steps: int, corpus: Path, tmp: str):
        import memstore
        from memstore.trainer import configs
        from memstore.trainer.config import load_config
        from memstore.trainer.ray_train import StoreTables
        from memstore.trainer.replica import Replica

        args = load_config(
            configs.path("text-small-engram"),
            [
                "workers=0",
                f"data.path={corpus}",
                f"steps={steps}",
                "eval_every=0",
                "checkpoint_every=0",
                "progress=false",
                f"run_dir={tmp}/run",
                f"store.name={Path(tmp).name}",
                f"model.engram_prefetch={str(prefetch).lower()}",
            ],
        )
        self.store = StoreTables(args, f"{tmp}/root", world=1) if table == "store" else None
        if self.store is not None:
            self.store.prepare(0, None)
        self.replica = Replica(args, tables=None if self.store is None else self.store.connect())
        self.stepped = [
            t
            for t in self.replica.model.value_tables().values()
            if not (isinstance(t, memstore.Table) and t.config.get("step_on_push"))
        ]

    def step(self, step: int) -> float:
        """Seconds of the replica's step and the local table's step."""
        start = time.perf_counter()
        self.replica.train_step(step)
        for t in self.stepped:
            t.step(step)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.store is not None:
            self.store.drop()


def measure_engram(steps: int) -> dict:
    """{setting: [seconds of each measured step]}. The settings run side by side in
    this process, in turns of ENGRAM_BLOCK steps, so that the machine's drift hits all
    of them; the first WARMUP_STEPS of each and the first step of every turn (whose
    lookahead lookup had the other settings' turns to arrive) are not measured."""
    import ray

    from memstore.bench.text import stdlib_corpus

    corpus = stdlib_corpus(ROOT / "runs" / "text-corpus" / "stdlib.txt")
    samples: dict[str, list[float]] = {name: [] for name in ENGRAM_SETTINGS}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs: dict[str, EngramRun] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, (table, prefetch)) in enumerate(ENGRAM_SETTINGS.items()):
                runs[name] = EngramRun(table, prefetch, steps, corpus, f"{tmp}/bench-engram-{i}")
            with tqdm(total=steps * len(runs), desc="train_step --engram", unit="step") as bar:
                for first in range(1, steps + 1, ENGRAM_BLOCK):
                    for name, run in runs.items():
                        for step in range(first, min(first + ENGRAM_BLOCK, steps + 1)):
                            seconds = run.step(step)
                            if step > WARMUP_STEPS and step != first:
                                samples[name].append(seconds)
                            bar.update()
    finally:
        for run in runs.values():
            run.close()
        ray.shutdown()
    return samples


def report_engram(samples: dict, steps: int, load: float) -> None:
    """Print the Engram table and write it to benchmarks/results/train_step_engram.json."""
    ms = {name: 1e3 * statistics.median(v) for name, v in samples.items()}
    quartiles = {
        name: [1e3 * q for q in statistics.quantiles(v, n=4)] for name, v in samples.items()
    }
    local = {prefetch: ms[n] for n, (t, prefetch) in ENGRAM_SETTINGS.items() if t == "local"}
    print(
        "\n| setting (text-small-engram, 1 rank, batch 32 × 64 bytes) | ms / step (median) "
        "| quartiles | vs local table, same prefetch |"
    )
    print("|---|---:|---|---:|")
    figures = {}
    for name, (_, prefetch) in ENGRAM_SETTINGS.items():
        spread = f"{quartiles[name][0]:.1f}–{quartiles[name][2]:.1f}"
        ratio = ms[name] / local[prefetch]
        print(f"| {name} | {ms[name]:.1f} | {spread} | {ratio:.2f}× |")
        figures[name] = {
            "ms / step": ms[name],
            "quartiles (ms)": spread,
            "vs local table, same prefetch": ratio,
        }
    store = ms["Engram, store table (2 shards), prefetch"]
    verdict = "met" if store <= 1.1 * local[True] else "missed"
    print(f"store / local with prefetch: {store / local[True]:.2f}× (target ≤ 1.1×: {verdict})")
    measured = len(next(iter(samples.values())))
    write_result(
        "train_step_engram",
        figures,
        command_line("benchmarks.train_step"),
        title="Training step: Engram table in the store against a local table",
        notes=(
            f"text-small-engram.yaml, one rank in one process (1 torch thread), the store "
            f"on a local Ray instance (2 shards, data channel, step on the last push); the "
            f"four settings side by side in turns of {ENGRAM_BLOCK} steps, {steps} steps "
            f"each, median of {measured} measured steps each (without the first "
            f"{WARMUP_STEPS} and the first of every turn); 1-min load average {load:.1f} at "
            f"the start. Target: with prefetch, the store step ≤ 1.1× the local-table step "
            f"({verdict}: {store / local[True]:.2f}×)."
        ),
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
    parser.add_argument(
        "--engram",
        action="store_true",
        help="the Engram settings: store against local table, with and without prefetch",
    )
    ns = parser.parse_args(argv)
    if ns.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must exceed {WARMUP_STEPS + 1}")
    if ns.engram:
        if ns.trees or ns.settings:
            parser.error("--engram runs its own settings: no --trees or --settings")
        if ns.steps <= WARMUP_STEPS + ENGRAM_BLOCK:
            parser.error(f"--engram needs --steps above {WARMUP_STEPS + ENGRAM_BLOCK}")
        start, load = time.perf_counter(), os.getloadavg()[0]
        samples = measure_engram(ns.steps)
        print(
            f"\n{os.cpu_count()} CPU threads; 1-min load average {load:.1f} at the start; "
            f"{ns.steps} steps per setting, {time.perf_counter() - start:.0f} s"
        )
        print(f"command: python -m benchmarks.train_step {' '.join(sys.argv[1:])}".rstrip())
        report_engram(samples, ns.steps, load)
        return 0
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
