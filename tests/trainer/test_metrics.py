"""trainer.metrics: metrics.jsonl keeps its history up to a restored step and drops the
lines after it; without a terminal the progress bar prints whole lines, not one per
step. Expected lines are written here.
"""

import io
import json

from memstore.trainer.metrics import Metrics, plot, progress_bar


def test_metrics_keep_the_history_up_to_a_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = Metrics(path, keep_until=None)
    for step in range(1, 6):
        first.log({"step": step, "loss": 1.0 / step})
    first.set_last_eval({"recall": 0.5, "nll": 1.0})
    again = Metrics(path, keep_until=3)
    assert [r["step"] for r in again.rows] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert Metrics(path, keep_until=0).rows == [] and path.read_text() == ""
    plot(first, tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_without_a_terminal_the_bar_prints_whole_lines_not_one_per_step():
    log = io.StringIO()  # not a terminal
    bar = progress_bar(1000, 0, True, "run", stream=log)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="1.0", refresh=False)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 2 <= len(lines) <= 3  # start, (maybe one), end
    assert lines[-1].startswith("run: 100%") and "1000/1000" in lines[-1]
    silent = io.StringIO()
    progress_bar(10, 0, False, "run", stream=silent).close()
    assert silent.getvalue() == ""
