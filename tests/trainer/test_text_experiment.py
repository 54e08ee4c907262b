"""memstore.bench.text: its five models (dense, memory, PKM peer, Engram and Engram's
dense twin), their fairness checks, and the table and summary.json of a run. No model
is trained here: the runs' evaluation curves are made up."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memstore.bench._experiment import check_equal_macs, per_token_macs
from memstore.trainer import configs
from memstore.trainer.config import load_config

text = pytest.importorskip("memstore.bench.text")  # its PKM peer needs the bench extra

BACKBONE = ("dim", "n_layers", "n_heads", "max_seq_len", "ffn_hidden")
# The fields of the layer that the memory and the Engram configs each set.
MEMORY_LAYER = {"memory_layers", "memory_plus", "mem_heads", "mem_k", "mem_n_keys"}
MEMORY_LAYER |= {"mem_key_dim", "shared_memory"}
ENGRAM_LAYER = {
    f"engram_{k}" for k in ("layers", "orders", "heads", "rows", "dim", "kernel", "prefetch")
}
# The 6 smallest primes >= 65,521: one table per hash head (orders 2-4, 2 heads each).
ENGRAM_PRIMES = (65521, 65537, 65539, 65543, 65551, 65557)


@pytest.mark.parametrize("quick", [True, False])
def test_the_engram_model_and_its_twin_load_beside_the_memory_model(quick):
    paths = text.configs(quick)
    size = "small-" if quick else ""
    assert paths["engram"].name == paths["engram-dense"].name == f"text-{size}engram.yaml"
    args, margs = text.load_runs(paths, [])
    assert margs["engram"].engram_layers == [0] and margs["engram"].memory_layers == []
    twin = margs["engram-dense"]
    assert twin.engram_layers == [] and twin.memory_layers == []
    for name in ("memory", "engram", "engram-dense"):
        assert all(getattr(margs[name], k) == getattr(margs["dense"], k) for k in BACKBONE)
    memory, engram = args["memory"].model, args["engram"].model
    differ = {k for k in set(memory) | set(engram) if memory.get(k) != engram.get(k)}
    assert differ == MEMORY_LAYER | ENGRAM_LAYER
    assert args["engram"].steps == args["memory"].steps == args["engram-dense"].steps


def test_each_layer_model_has_a_twin_of_its_multiply_adds():
    """The Engram layer costs more than the memory layer: the memory model's twin is not
    Engram's, so Engram gets its own (its FFN widened by the Engram multiply-adds)."""
    _, margs = text.load_runs(text.configs(quick=True), [])
    macs = {name: per_token_macs(m) for name, m in margs.items()}
    for model, twin in text.TWINS.items():
        check_equal_macs(macs, model, twin)
    memory_twin = 3 * 128 * (3 * 344 + 363)  # its FFNs; the memory layer's slot widened
    engram = 4 * 3 * 128 * 344 + 49_984  # its FFNs and the Engram layer
    with pytest.raises(
        SystemExit, match=f"dense and engram differ by {1 - memory_twin / engram:.1%}"
    ):
        check_equal_macs(macs, "engram", "dense")
    widened = margs["engram-dense"].layer_ffn_hidden
    assert widened[1:] == [margs["engram"].ffn_hidden] * 3
    assert 3 * 128 * widened[0] == pytest.approx(
        3 * 128 * margs["engram"].ffn_hidden + macs["engram"]["engram"], abs=3 * 128 / 2
    )


@pytest.mark.parametrize(
    "override,named",
    [("model.dim=64", "model.dim"), ("lr=0.01", "lr"), ("model.n_layers=3", "model.n_layers")],
)
def test_an_engram_config_that_differs_beyond_its_layer_is_refused(override, named):
    args, _ = text.load_runs(text.configs(quick=True), [])
    args["engram"] = load_config(configs.path("text-small-engram"), [override])
    with pytest.raises(SystemExit, match=f"engram and memory configs differ in .*'{named}'"):
        text.check_engram(args)


def test_a_twin_that_is_not_dense_or_an_engram_config_without_engram_is_refused():
    args, _ = text.load_runs(text.configs(quick=True), [])
    args["engram-dense"] = load_config(configs.path("text-small-engram"))
    with pytest.raises(SystemExit, match="engram-dense config needs dense_equivalent"):
        text.check_fair(args, "engram-dense", "engram")
    args["engram"] = load_config(configs.path("text-small-memory"))
    with pytest.raises(SystemExit, match="engram_layers"):
        text.check_engram(args)


def made_up_curve(seconds: list[float], val: list[float]) -> dict:
    return {
        "step": np.array([150.0, 300.0]),
        "step_ms": 10.0,
        "tokens": np.array([9600.0, 19200.0]),
        "seconds": np.array(seconds),
        "train_bits_per_byte": np.array(val) - 0.1,
        "val_bits_per_byte": np.array(val),
        "total_seconds": seconds[-1],
        "total_tokens": 19200,
    }


# seconds and validation bits per byte at the two evaluations; T = 10 s (the dense runs)
CURVES = {
    "dense": ([5.0, 10.0], [2.6, 2.5]),
    "memory": ([6.0, 12.0], [2.4, 2.0]),
    "pkm": ([8.0, 16.0], [2.6, 2.2]),
    "engram": ([5.0, 20.0], [2.0, 1.0]),
    "engram-dense": ([5.0, 10.0], [2.4, 2.0]),
}


def made_up_training(tmp_path, monkeypatch) -> tuple[dict, list[str]]:
    """``text.train_models`` replaced by the made-up CURVES of the models asked for;
    returns what it was asked (``paths``, ``model_overrides``) and the arguments of a
    quick run on a small corpus writing to ``tmp_path / "out"``."""
    trained = {}

    def train_models(paths, out, overrides, keys, model_overrides):
        trained.update(paths=paths, model_overrides=model_overrides)
        curves = {name: made_up_curve(*CURVES[name]) for name in paths}
        return {name: 1.0 for name in paths}, curves

    monkeypatch.setattr(text, "train_models", train_models)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 200, encoding="utf-8")
    return trained, ["--quick", "--corpus", str(corpus), "--out", str(tmp_path / "out")]


def test_the_table_and_summary_hold_engram_against_its_twin(tmp_path, monkeypatch, capsys):
    trained, argv = made_up_training(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert text.main(argv) == 0

    assert list(trained["paths"]) == ["dense", "memory", "pkm", "engram", "engram-dense"]
    assert trained["model_overrides"] == {"engram-dense": ["dense_equivalent=true"]}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(CURVES)
    assert summary["T_seconds"] == 10.0
    # engram at T = 10 s: 2.0 - (10 - 5) / (20 - 5) · (2.0 - 1.0) = 5/3; its twin: 2.0
    assert summary["results"]["engram"]["val_bpb_at_T"] == pytest.approx(5 / 3)
    assert summary["engram_vs_dense"] == pytest.approx({"val_bpb": 0.5, "val_bpb_at_T": 1 / 6})
    memory_at_t = 2.4 - (10 - 6) / (12 - 6) * (2.4 - 2.0)
    assert summary["memory_vs_dense"] == pytest.approx(
        {"val_bpb": 1 - 2.0 / 2.5, "val_bpb_at_T": 1 - memory_at_t / 2.5}
    )
    assert summary["targets_met"]["engram_vs_dense_equal_time"] is True
    values = 32 * sum(ENGRAM_PRIMES)  # rows of 32 floats: the values, apart from the MACs
    assert summary["parameters"]["engram"]["values"] == values
    assert summary["parameters"]["engram-dense"]["values"] == 0
    engram = 6 * 32 + 2 * (6 * 32) * 128 + 128 + 4 * 128  # rows, W_K and W_V, gate, conv
    macs = 4 * 4 * 128 * 128 + 4 * 3 * 128 * 344 + engram + 128 * 256  # + attn, FFNs, out
    assert summary["macs_per_token"]["engram"] == {
        "total": macs,
        "ffn_slots": 4 * 3 * 128 * 344,
        "engram": engram,
    }
    table = capsys.readouterr().out
    assert f" + {values:,} | {macs:,} |" in table.split("| engram |")[1].splitlines()[0]
    assert "| engram-dense |" in table and " + 0 |" in table.split("| engram-dense |")[1]
    engram_layer = "Engram after layers [0]: byte n-grams of orders [2, 3, 4], 2 hash heads"
    assert f"{engram_layer} per order, {sum(ENGRAM_PRIMES):,} rows × 32" in table
    assert "`text-small-engram.yaml` `--set dense_equivalent=true`" in table
    assert "Engram vs engram-dense" in table and "16.7% lower at equal time" in table
    assert (out / "val_bpb_vs_tokens.png").stat().st_size > 0
    assert (out / "val_bpb_vs_seconds.png").stat().st_size > 0


def test_each_run_gets_the_common_overrides_then_its_own(tmp_path, monkeypatch):
    from memstore.bench import _experiment

    runs = {}

    def run(name, config, run_dir, overrides):
        runs[name] = overrides
        return 1.0

    monkeypatch.setattr(_experiment, "run", run)
    monkeypatch.setattr(_experiment, "curve", lambda run_dir, keys: {"total_tokens": 64})
    paths = text.configs(quick=True)
    _experiment.train_models(paths, tmp_path, ["steps=3"], (), text.MODEL_OVERRIDES)
    assert runs == {
        name: ["steps=3", "dense_equivalent=true"] if name == "engram-dense" else ["steps=3"]
        for name in text.MODELS
    }
