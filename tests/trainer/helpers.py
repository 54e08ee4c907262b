"""Shared by the trainer's tests: a config of the shipped files, a run's metrics."""

import json
from pathlib import Path

from memstore.trainer.config import TrainArgs, load_config
from memstore.trainer.loop import METRICS

CONFIGS = Path(__file__).resolve().parents[2] / "memstore" / "trainer" / "configs"


def config(name: str, tmp_path, *overrides: str) -> TrainArgs:
    return load_config(
        CONFIGS / f"{name}.yaml", [f"run_dir={tmp_path / name}", "progress=false", *overrides]
    )


def metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / METRICS, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tree(run_dir, skip=(METRICS, "config.yaml", "loss.png")) -> dict:
    """Every file under run_dir (but those the next run rewrites) with its bytes: what
    "nothing was deleted or changed" compares."""
    run_dir = Path(run_dir)
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in skip
    }
