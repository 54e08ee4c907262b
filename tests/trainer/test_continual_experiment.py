"""memstore.bench.continual at a tiny size: a pretraining run and every fine-tuning
method from its checkpoint, the summary, the plot and the table; and its choice of
learning rate and its verdicts on made-up outcomes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("peft")

from memstore.bench import continual  # noqa: E402

TINY_FORM = {
    "config": "continual-small-pretrain",
    "steps": 4,
    "eval_every": 2,
    "top_t": 16,
    "sweep": {"full": [1e-3], "lora": [1e-3], "memory": [1e-2, 3e-2], "sparse_memory": [1e-1]},
}
TINY_MODEL = [
    "model.dim=32",
    "model.n_heads=2",
    "model.max_seq_len=8",
    "model.mem_heads=2",
    "model.mem_k=4",
    "model.mem_n_keys=8",
    "model.mem_key_dim=16",
    "data.entities=20",
    "data.attributes=4",
    "data.values=8",
    "data.seq_len=8",
    "data.new_facts=0.25",
    "data.eval_windows=8",
    "batch_size=8",
    "steps=6",
    "eval_every=3",
    "checkpoint_every=6",
    "warmup=1",
]


def test_the_experiment_runs_every_method_and_writes_its_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(continual, "form", lambda quick: TINY_FORM)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "out"
    sets = [arg for s in TINY_MODEL for arg in ("--set", s)]
    assert continual.main(["--quick", "--corpus", str(corpus), "--out", str(out), *sets]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(continual.METHODS)
    for method, runs in summary["results"].items():
        assert set(runs) == {f"{lr:g}" for lr in TINY_FORM["sweep"][method]}
        assert summary["chosen_lr"][method] in TINY_FORM["sweep"][method]
        for lr, r in runs.items():
            # One point per evaluation (steps 2 and 4) after the pretrained model's.
            assert r["points"]["step"] == [0, 2, 4]
            rows = [json.loads(line) for line in open(out / f"{method}-lr{lr}" / "metrics.jsonl")]
            last = [row["eval"] for row in rows if "eval" in row][-1]
            pre = summary["pretrained"]
            assert r["new_recall"] == last["recall_second"]
            assert r["first_lost"] == pytest.approx(pre["recall_first"] - last["recall_first"])
            gained = last["val_bits_per_byte"] - pre["val_bits_per_byte"]
            assert r["val_bpb_gained"] == pytest.approx(gained)
    assert isinstance(summary["verdicts"]["all_met"], bool)
    assert (out / continual.PLOT).stat().st_size > 0
    printed = capsys.readouterr().out
    assert all(f"| {m} |" in printed for m in continual.METHODS)


def made_up(new: float, lost: float, bpb: float) -> dict:
    """A run ending at these figures, having reached 0.9 new-fact recall with them."""
    reached = new >= continual.TARGET_NEW
    return {
        "new_recall": new,
        "first_lost": lost,
        "val_bpb_gained": bpb,
        "lost_at_target": lost if reached else None,
        "bpb_at_target": bpb if reached else None,
    }


def test_forgetting_is_read_where_the_new_facts_first_reach_the_target():
    at = continual.at_target([0.0, 0.8, 1.0, 0.95], [0.0, 0.1, 0.3, 0.4], [0.0, 0.2, 0.6, 0.7])
    assert at["lost_at_target"] == pytest.approx(0.2) and at["bpb_at_target"] == pytest.approx(0.4)
    never = continual.at_target([0.0, 0.5], [0.0, 0.1], [0.0, 0.1])
    assert never == {"lost_at_target": None, "bpb_at_target": None}


def test_the_chosen_lr_reaches_the_target_with_the_least_forgetting():
    runs = {
        1e-3: made_up(0.95, 0.3, 0.1),
        3e-3: made_up(0.99, 0.5, 0.2),
        1e-4: made_up(0.5, 0.0, 0),
    }
    assert continual.choose(runs) == 1e-3
    short = {1e-4: made_up(0.5, 0.0, 0.0), 1e-3: made_up(0.7, 0.1, 0.0)}
    assert continual.choose(short) == 1e-3  # none reaches 0.9: the most learned


def test_verdicts_compare_sparse_memory_with_each_method():
    chosen = {
        "full": made_up(1.0, 0.40, 0.50),
        "lora": made_up(0.9, 0.10, 0.20),
        "memory": made_up(1.0, 0.05, 0.02),
        "sparse_memory": made_up(0.92, 0.03, 0.01),
    }
    v = continual.verdicts(chosen)
    assert v["facts_vs_full"]["met"] and v["facts_vs_full"]["ratio"] == pytest.approx(0.075)
    assert v["text_vs_full"]["met"] and v["facts_vs_lora"]["met"] and v["text_vs_lora"]["met"]
    assert v["text_vs_memory"]["met"] and v["all_met"]
    chosen["sparse_memory"] = made_up(0.85, 0.06, 0.03)
    v = continual.verdicts(chosen)
    assert not v["sparse_new_recall"]["met"]
    assert not v["facts_vs_full"]["met"] and not v["text_vs_memory"]["met"]
    assert not v["all_met"]
