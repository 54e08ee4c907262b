"""examples/hf_memory.py runs (small arguments): both Llamas scored at equal steps,
identical at step 0 (the memory layer beside the MLP starts silent)."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_memory.py"


def test_the_example_compares_recall_at_equal_steps(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hf_memory", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    small = "--entities 32 --attributes 2 --values 8 --dim 32 --n-keys 8 --batch-size 16"
    recall = example.main(
        [*small.split(), "--steps", "8", "--eval-every", "4", "--out-dir", str(tmp_path)]
    )
    assert sorted(recall["plain"]) == sorted(recall["memory"]) == [0, 4, 8]
    assert recall["plain"][0] == recall["memory"][0]
    assert all(0 <= r <= 1 for run in recall.values() for r in run.values())
    assert "with memory" in capsys.readouterr().out
