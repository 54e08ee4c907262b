"""The trainer's model with Engram layers: configs, tables, push ids, a short run.

The Engram configs load and match the memory side of the experiment; table specs, push
ids and set_step cover every Engram table, and the backward reaches each; dense_equivalent
drops the Engram layers for their multiply-adds, counted here; bad Engram fields are
refused by name; the small config trains in-process, and a resumed run repeats the loss
curve of the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import sympy
import torch

from memstore import EngramLayer, InvalidArgument
from memstore.bench._experiment import parameters, per_token_macs
from memstore.trainer.model import (
    ModelArgs,
    Transformer,
    dense_equivalent,
    engram_macs,
    table_specs,
)
from memstore.trainer.train import train

from .helpers import config, metrics

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "def sub(a, b):\n    return a - b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n"
)


def tiny(**overrides) -> ModelArgs:
    base = dict(
        vocab_size=256,
        dim=16,
        n_layers=3,
        n_heads=2,
        max_seq_len=16,
        engram_layers=[1],
        engram_orders=[2, 3],
        engram_heads=2,
        engram_rows=11,
        engram_dim=4,
    )
    return ModelArgs(**{**base, **overrides})


def primes_from(start: int, count: int) -> list[int]:
    out = [sympy.nextprime(start - 1)]
    while len(out) < count:
        out.append(sympy.nextprime(out[-1]))
    return out


@pytest.mark.parametrize("size", ["small-", ""])
def test_the_engram_configs_load_and_match_the_memory_side(tmp_path, size):
    engram = config(f"text-{size}engram", tmp_path)
    memory = config(f"text-{size}memory", tmp_path)
    margs = engram.model_args(256)
    assert margs.engram_layers == [0] and margs.memory_layers == []
    rows = sum(primes_from(65521, len(margs.engram_orders) * margs.engram_heads))
    assert table_specs(margs) == {"engram.0": (rows, 32)}
    e, m = engram.to_dict(), memory.to_dict()
    differ = {k for k in set(e) | set(m) if e.get(k) != m.get(k)}
    assert differ == {"model", "store", "run_dir"}
    assert {k for k in e["store"] if e["store"][k] != m["store"][k]} == {"name"}
    e, m = margs.to_dict(), memory.model_args(256).to_dict()
    differ = {k for k in e if e[k] != m[k]}  # the layers only: the backbone is the same
    assert "engram_layers" in differ and all(k.startswith(("engram_", "mem")) for k in differ)


def test_table_specs_push_ids_and_set_step():
    args = tiny(memory_layers=[0, 2], mem_n_keys=4, mem_k=2, mem_key_dim=8, engram_layers=[0, 2])
    model = Transformer(args, rank=1, micro_batches=2)
    rows = sum(primes_from(11, 4))
    assert table_specs(args) == {"memory": (16, 16), "engram.0": (rows, 4), "engram.2": (rows, 4)}
    assert model.pushes_per_rank() == {"memory": 4, "engram.0": 2, "engram.2": 2}
    tables = model.value_tables()
    layers = model.engram_layers()
    assert [type(m) for m in layers] == [EngramLayer, EngramLayer]
    assert [m.table for m in layers] == [tables["engram.0"], tables["engram.2"]]
    model.set_step(3, micro_batch=1, value_lr=0.25)
    # (rank · micro_batches + micro_batch) · layers + layer, per table
    assert [m.push_id for m in layers] == [3, 3]
    assert [m.push_id for m in model.memory_layers()] == [6, 7]
    assert all(m.step == 3 and m.value_lr == 0.25 for m in layers)
    assert layers[0].multipliers.tolist() != layers[1].multipliers.tolist()  # seed + layer


def test_the_backward_reaches_every_engram_table():
    model = Transformer(tiny(engram_layers=[0, 2]))
    model.set_step(1)
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    model(tokens).square().mean().backward()
    assert all(t.pushes(1) == [0] for t in model.value_tables().values())
    assert all(m.key.weight.grad is not None for m in model.engram_layers())


def test_dense_equivalent_drops_engram_for_its_multiply_adds():
    args = tiny()
    dense = dense_equivalent(args)
    assert dense.engram_layers == [] and table_specs(dense) == {}
    memory_dim = 4 * 4
    assert engram_macs(args) == memory_dim + 2 * memory_dim * 16 + 16 + 4 * 16
    want = args.ffn_width(1) + engram_macs(args) / (3 * 16)
    assert dense.layer_ffn_hidden == [args.ffn_width(0), round(want), args.ffn_width(2)]
    macs = per_token_macs(args)
    assert macs["engram"] == engram_macs(args)
    assert macs["total"] == pytest.approx(per_token_macs(dense)["total"], rel=0.02)
    counted = parameters(args)
    assert counted["values"] == table_specs(args)["engram.1"][0] * 4
    assert counted["dense"] == sum(p.numel() for p in Transformer(args).parameters())


@pytest.mark.parametrize(
    "field,value",
    [("engram_layers", [3]), ("engram_layers", [1, 1]), ("engram_heads", 0),
     ("engram_orders", [2, 2]), ("engram_dim", 0), ("engram_rows", 0)],
)  # fmt: skip
def test_bad_engram_fields_are_refused_by_name(field, value):
    with pytest.raises(InvalidArgument) as e:
        tiny(**{field: value})
    assert e.value.field == field


def test_the_small_engram_config_trains_in_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    args = config(
        "text-small-engram",
        tmp_path,
        "workers=0",
        f"data.path={corpus}",
        "data.seq_len=16",
        "data.eval_windows=8",
        "data.eval_batch_size=8",
        "model.dim=32",
        "model.n_layers=2",
        "model.max_seq_len=16",
        "model.engram_rows=257",
        "batch_size=8",
        "steps=30",
        "warmup=2",
        "eval_every=0",
        "checkpoint_every=0",
    )
    result = train(args)
    losses = [r["loss"] for r in metrics(args.run_dir)]
    assert len(losses) == 30 and result["eval"]["bits_per_byte"] > 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert dataclasses.asdict(args.model_args(256))["engram_layers"] == [0]


def test_a_resumed_engram_run_repeats_the_loss_curve(tmp_path):
    """The checkpoint holds the Engram table: without it the resumed losses differ."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    small = [
        "workers=0",
        f"data.path={corpus}",
        "data.seq_len=16",
        "data.eval_windows=8",
        "data.eval_batch_size=8",
        "model.dim=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.max_seq_len=16",
        "model.engram_rows=67",
        "batch_size=4",
        "steps=6",
        "warmup=1",
        "eval_every=0",
        "checkpoint_every=2",
    ]
    whole = config("text-small-engram", tmp_path / "a", *small)
    train(whole)
    cut = config("text-small-engram", tmp_path / "b", *small)
    assert train(cut, stop_after=3)["stopped"]  # resumes at step 2
    assert train(cut, resume=True)["start"] == 2
    a, b = metrics(whole.run_dir), metrics(cut.run_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_the_text_experiment_trains_only_the_models_named(tmp_path, monkeypatch, capsys):
    """``--models engram engram-dense``: those two runs, their pair's gain and target;
    the memory model's config is still loaded for the fairness checks."""
    text = pytest.importorskip("memstore.bench.text")
    from .test_text_experiment import made_up_training

    trained, argv = made_up_training(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert text.main([*argv, "--models", "engram-dense", "engram"]) == 0
    assert list(trained["paths"]) == ["engram", "engram-dense"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"engram", "engram-dense"}
    # T = 10 s (engram-dense); engram at T: 5/3 against its twin's 2.0
    assert summary["engram_vs_dense"] == pytest.approx({"val_bpb": 0.5, "val_bpb_at_T": 1 / 6})
    assert summary["targets_met"] == {"engram_vs_dense_equal_time": True}
    assert "memory_vs_dense" not in summary and "memory_ahead_of_pkm" not in summary
    table = capsys.readouterr().out
    assert "| engram |" in table and "| memory |" not in table and "PKM peer" not in table
    with pytest.raises(SystemExit):
        text.main([*argv, "--models", "nonsense"])
