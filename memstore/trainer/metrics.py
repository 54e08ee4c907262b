"""What a run reports: ``metrics.jsonl``, the loss plot, and the progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["Metrics", "plot", "progress_bar", "LOG_INTERVAL_S"]

# Without a terminal (a log file, a Ray worker's output), the bar prints one line at
# most this often instead of redrawing itself on every step.
LOG_INTERVAL_S = 5.0


class Metrics:
    """metrics.jsonl: one JSON object per step: ``step``, ``loss`` (mean over the
    global batch's target tokens), ``lr`` (dense), ``grad_norm`` (dense, before
    clipping), ``tokens`` (input tokens seen so far), ``seconds`` (training time so
    far: the steps only, without evaluation and checkpoints, carried over resumes),
    and ``eval`` at evaluation steps (facts: trainer.data.evaluate's recall,
    recall_any, nll; text: StepData.evaluate's train_ and val_ nll and bits_per_byte).
    On resume or restore, lines after the restored step are dropped so that the file
    is the history of the run that continues."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        self.rows: list[dict] = []
        if keep_until is not None and path.exists():
            with open(path, encoding="utf-8") as f:
                self.rows = [r for r in map(json.loads, f) if r.get("step", 0) <= keep_until]
        self.rewrite()

    def rewrite(self) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def set_last_eval(self, evaluation: dict) -> None:
        self.rows[-1]["eval"] = evaluation
        self.rewrite()

    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.rows if "loss" in r]


def plot(metrics: Metrics, path: Path, title: str) -> None:
    """The loss curve, evaluation NLLs and (facts) recall, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*metrics.losses(), strict=True) if metrics.losses() else ((), ())
    ax.plot(steps, losses, lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    evals = [r for r in metrics.rows if "eval" in r]
    at = [r["step"] for r in evals]
    for key, label in (
        ("train_nll", "eval nll, training windows"),
        ("val_nll", "eval nll, validation windows"),
    ):
        if evals and key in evals[0]["eval"]:
            ax.plot(at, [r["eval"][key] for r in evals], "o-", ms=3, label=label)
    if evals and "recall" in evals[0]["eval"]:
        ax.plot(at, [r["eval"]["nll"] for r in evals], "o-", ms=3, label="eval nll")
        ax2 = ax.twinx()
        ax2.plot(
            at,
            [r["eval"]["recall"] for r in evals],
            "s--",
            ms=3,
            color="tab:green",
            label="eval recall",
        )
        ax2.set_ylabel("recall")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Lines:
    """A stream that turns tqdm's in-place redraws into whole lines (for logs)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, initial: int, enabled: bool, desc: str, stream=None):
    """A tqdm bar on ``stream`` (stderr): redrawn in place on a terminal; elsewhere one
    line every :data:`LOG_INTERVAL_S` seconds at most, readable in a log."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    terminal = hasattr(stream, "isatty") and stream.isatty()
    options = (
        {"dynamic_ncols": True}
        if terminal
        else {"file": _Lines(stream), "mininterval": LOG_INTERVAL_S, "ncols": 100}
    )
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, **options)
