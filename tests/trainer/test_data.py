"""trainer.data: the synthetic facts corpus and byte-level text.

Facts use disjoint token ranges, score only the value token and are fixed by their
seeds; the evaluation asks every fact once, its recall and NLL against a log-sum-exp
computed here. Byte windows are consecutive bytes of the file; a held-out fraction or a
validation file is never sampled for training; text NLL is the mean over every target,
against a loop over the model's log-probabilities written here; bad inputs and text
configs name the field; a run reports train and validation bits per byte.
"""

import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from memstore import InvalidArgument
from memstore.trainer import train as tr
from memstore.trainer.data import (
    Batch,
    ByteDataset,
    FactsCorpus,
    MixedData,
    evaluate,
    text_nll,
    text_splits,
)


def test_facts_use_disjoint_token_ranges_and_score_only_the_value():
    corpus = FactsCorpus(entities=10, attributes=3, values=7, seed=1)
    assert corpus.vocab_size == 20 and corpus.n_facts == 30
    seq = corpus.sequences()
    assert seq.shape == (30, 3) and seq.dtype == torch.int64
    assert seq[:, 0].tolist() == [f // 3 for f in range(30)]
    assert set(seq[:, 1].tolist()) == set(range(10, 13))
    assert set(seq[:, 2].tolist()) <= set(corpus.value_tokens) == set(range(13, 20))
    assert (seq[:, 2] - 13).tolist() == corpus.table.reshape(-1).tolist()
    batch = corpus.batch(np.array([4, 0]))
    assert batch.inputs.tolist() == seq[[4, 0], :2].tolist()
    assert batch.targets.tolist() == seq[[4, 0], 1:].tolist()
    assert batch.mask.tolist() == [[False, True], [False, True]]


def test_facts_and_batches_are_fixed_by_their_seeds():
    a, b, c = (FactsCorpus(50, 4, 9, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.table, b.table) and not np.array_equal(a.table, c.table)
    first = list(islice(a.batches(16, seed=7), 3))
    again = list(islice(b.batches(16, seed=7), 3))
    other = list(islice(a.batches(16, seed=8), 3))
    for x, y in zip(first, again):
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert not all(torch.equal(x.inputs, y.inputs) for x, y in zip(first, other))
    assert first[0].inputs.shape == (16, 2)


def test_bad_corpus_arguments_are_refused():
    with pytest.raises(InvalidArgument) as e:
        FactsCorpus(0, 2, 3)
    assert e.value.field == "entities"
    with pytest.raises(InvalidArgument) as e:
        next(FactsCorpus(2, 2, 3).batches(0))
    assert e.value.field == "batch_size"


class Oracle(torch.nn.Module):
    """Knows every fact; records which facts it was asked."""

    def __init__(self, corpus: FactsCorpus, wrong_entities=(), favour_token: int | None = None):
        super().__init__()
        self.corpus, self.wrong, self.favour = corpus, set(wrong_entities), favour_token
        self.asked: list[tuple[int, int]] = []

    def forward(self, inputs):
        c = self.corpus
        logits = torch.zeros(*inputs.shape, c.vocab_size)
        for n, (e, a) in enumerate(inputs.tolist()):
            self.asked.append((e, a))
            value = int(c.table[e, a - c.entities])
            if e in self.wrong:
                value = (value + 1) % c.values
            logits[n, 1, c.entities + c.attributes + value] = 5.0
            if self.favour is not None:
                logits[n, 1, self.favour] = 9.0
        return logits


def test_evaluation_asks_every_fact_once_and_scores_recall_and_nll():
    corpus = FactsCorpus(entities=13, attributes=3, values=5, seed=0)
    model = Oracle(corpus, wrong_entities={0, 1, 2, 3}).train()
    result = evaluate(model, corpus, batch_size=7)  # 39 facts: the last batch is short
    assert sorted(model.asked) == sorted(
        (e, corpus.entities + a) for e in range(13) for a in range(3)
    )
    assert result["facts"] == 39
    assert result["recall"] == result["recall_any"] == pytest.approx(27 / 39)
    lse = math.log(math.exp(5.0) + corpus.vocab_size - 1)
    expected_nll = (27 * (lse - 5.0) + 12 * lse) / 39
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert model.training  # mode restored


def test_restricted_recall_ignores_tokens_outside_the_values():
    corpus = FactsCorpus(entities=6, attributes=2, values=4, seed=0)
    result = evaluate(Oracle(corpus, favour_token=0), corpus)  # an entity token wins overall
    assert result["recall"] == 1.0 and result["recall_any"] == 0.0


def test_byte_windows_are_consecutive_bytes_of_the_file(tmp_path):
    text = "memory layers — ünïcödé facts\n" * 20
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    raw = text.encode("utf-8")
    data = ByteDataset(path, seq_len=16)
    assert len(data) == len(raw) - 16 and data.vocab_size == 256
    batches = list(islice(data.batches(8, seed=5), 4))
    for batch in batches:
        assert batch.inputs.shape == batch.targets.shape == (8, 16) and batch.mask is None
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        for row_in, row_out in zip(batch.inputs.tolist(), batch.targets.tolist()):
            window = bytes(row_in + row_out[-1:])
            assert window in raw
    again = list(islice(ByteDataset(path, seq_len=16).batches(8, seed=5), 4))
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(batches, again))
    assert data.window(np.array([0])).inputs[0].tolist() == list(raw[:16])


def test_a_file_shorter_than_a_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"abc")
    with pytest.raises(InvalidArgument) as e:
        ByteDataset(path, seq_len=3)
    assert e.value.field == "path"
    assert len(ByteDataset(path, seq_len=2)) == 1


def test_batch_is_a_named_tuple_with_an_optional_mask():
    inputs = torch.zeros(1, 2, dtype=torch.long)
    assert Batch(inputs, inputs).mask is None


# ---- held-out evaluation -------------------------------------------------------------


def _corpus(tmp_path, size: int, name: str = "corpus.txt", seed: int = 0):
    raw = np.random.default_rng(seed).integers(32, 127, size=size, dtype=np.uint8).tobytes()
    path = tmp_path / name
    path.write_bytes(raw)
    return path, raw


def test_a_held_out_fraction_is_never_sampled_for_training(tmp_path):
    path, raw = _corpus(tmp_path, 1000)
    train, val = text_splits(path, seq_len=16, val_fraction=0.25)
    split = 750  # floor(1000 * (1 - 0.25))
    assert (train.start, train.stop, val.start, val.stop) == (0, split, split, 1000)
    rng = np.random.default_rng(3)
    starts = np.concatenate([train.sample_starts(rng, 512) for _ in range(200)])
    # every training window [o, o + 17) ends at or before the split, and the draws reach
    # both ends of the allowed range
    assert starts.min() == 0 and starts.max() == split - 17
    batch = train.window(starts[:64])
    for o, row_in, row_out in zip(
        starts[:64].tolist(), batch.inputs.tolist(), batch.targets.tolist()
    ):
        assert bytes(row_in + row_out[-1:]) == raw[o : o + 17]
    fixed = val.fixed_starts(8)
    assert fixed[0] == split and fixed[-1] == 1000 - 17 and len(fixed) == 8
    assert np.array_equal(fixed, val.fixed_starts(8))  # the same windows every time
    with pytest.raises(InvalidArgument) as e:  # a window crossing into the held-out part
        train.window(np.array([split - 16]))
    assert e.value.field == "starts"


def test_a_validation_file_is_scored_and_never_trained_on(tmp_path):
    path, _ = _corpus(tmp_path, 300)
    val_path, val_raw = _corpus(tmp_path, 200, "val.txt", seed=1)
    train, val = text_splits(path, seq_len=8, val_path=val_path)
    assert (train.path, train.start, train.stop) == (str(path), 0, 300)
    assert (val.path, val.start, val.stop) == (str(val_path), 0, 200)
    batch = val.window(val.fixed_starts(4))
    assert bytes(batch.inputs[0].tolist()) == val_raw[:8]
    assert text_splits(path, seq_len=8)[1] is None


class ByteUnigram(torch.nn.Module):
    """Predicts every byte from fixed log-probabilities (no context): its NLL on a
    window is the mean of -log p over the window's targets."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp

    def forward(self, inputs):
        return self.logp.expand(*inputs.shape, 256)


def test_text_nll_is_the_mean_over_every_target_of_the_windows(tmp_path):
    path, raw = _corpus(tmp_path, 400)
    data = ByteDataset(path, seq_len=10)
    logp = torch.log_softmax(torch.randn(256, generator=torch.Generator().manual_seed(0)), 0)
    starts = data.fixed_starts(7)
    expected = np.mean([-float(logp[b]) for o in starts.tolist() for b in raw[o + 1 : o + 11]])
    model = ByteUnigram(logp).train()
    assert text_nll(model, data, starts, batch_size=3) == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_bad_text_inputs_name_the_field(tmp_path):
    path, _ = _corpus(tmp_path, 100)
    short, _ = _corpus(tmp_path, 5, "short.txt")
    cases = [
        ({"path": tmp_path / "missing.txt"}, "path"),
        ({"path": path, "val_path": tmp_path / "missing.txt"}, "val_path"),
        ({"path": short}, "path"),
        ({"path": path, "val_path": short}, "val_path"),
        ({"path": path, "val_fraction": 0.0}, "val_fraction"),
        ({"path": path, "val_fraction": 1.0}, "val_fraction"),
        ({"path": path, "val_fraction": -0.5}, "val_fraction"),
        ({"path": path, "val_fraction": "0.1"}, "val_fraction"),
        ({"path": path, "val_fraction": 0.01}, "val_fraction"),  # 1 byte held out: no window
        ({"path": path, "val_fraction": 0.1, "val_path": path}, "val_fraction"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgument) as e:
            text_splits(seq_len=8, **kwargs)
        assert e.value.field == field, kwargs


def test_bad_text_config_names_the_data_field(tmp_path):
    path, _ = _corpus(tmp_path, 100)
    short, _ = _corpus(tmp_path, 5, "short.txt")
    base = ["data.kind=text", f"data.path={path}", "data.seq_len=8"]
    for extra, field in [
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["data.val_fraction=0"], "data.val_fraction"),
        ([f"data.val_path={path}", "data.val_fraction=0.5"], "data.val_fraction"),
        (["data.kind=facts", "data.val_fraction=0.5"], "data.val_fraction"),
        (["data.kind=facts", f"data.val_path={path}"], "data.val_path"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            tr.load_config(None, base + extra)
        assert e.value.field == field
    for extra, field in [
        ([f"data.path={tmp_path / 'nope.txt'}"], "data.path"),
        ([f"data.val_path={short}"], "data.val_path"),
        (["data.val_fraction=0.05"], "data.val_fraction"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            tr.StepData(tr.load_config(None, base + extra))
        assert e.value.field == field


def test_training_reports_train_and_validation_bits_per_byte(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(120))
    path = tmp_path / "code.py"
    path.write_text(text)
    configs = Path(__file__).resolve().parents[2] / "memstore" / "trainer" / "configs"
    args = tr.load_config(
        configs / "tiny.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "progress=false",
            "data.kind=text",
            f"data.path={path}",
            "data.seq_len=8",
            "data.val_fraction=0.2",
            "data.eval_windows=16",
            "steps=4",
            "eval_every=2",
            "checkpoint_every=0",
        ],
    )
    result = tr.train(args)
    with open(Path(args.run_dir) / tr.METRICS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    evals = [r["eval"] for r in rows if "eval" in r]
    assert len(evals) == 2
    for ev in evals:
        assert {"train_bits_per_byte", "val_bits_per_byte", "train_nll", "val_nll"} <= set(ev)
        assert ev["train_bits_per_byte"] == pytest.approx(ev["train_nll"] / math.log(2))
        assert ev["bits_per_byte"] == ev["val_bits_per_byte"] != ev["train_bits_per_byte"]
        assert 0 < ev["val_bits_per_byte"] < 9  # below 8 bits of a uniform byte guess + slack
    assert result["eval"] == evals[-1]


def mixed(tmp_path, **kwargs) -> MixedData:
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(32, 127)) * 20)
    train, val = text_splits(text, 8, val_fraction=0.2)
    corpus = FactsCorpus(entities=10, attributes=4, values=6, seed=3)
    return MixedData(corpus, train, val, **{"text_fraction": 0.25, "new_facts": 0.2, **kwargs})


def test_mixed_batches_hold_text_windows_then_packed_facts_of_the_trained_set(tmp_path):
    data = mixed(tmp_path)
    corpus = data.corpus
    assert data.vocab_size == 256 + 10 + 4 + 6
    assert set(data.first) | set(data.second) == set(range(40))
    assert len(data.second) == 8 and not set(data.first) & set(data.second)
    batch = data.batch(np.random.default_rng(0), 8)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (8, 8)
    assert batch.mask[:2].all() and (batch.inputs[:2] < 256).all()  # 2 text windows
    first = set(data.first.tolist())
    for inputs, targets, mask in zip(batch.inputs[2:], batch.targets[2:], batch.mask[2:]):
        assert mask.tolist() == [False, True, False, False, True, False, False, True]
        for i in range(3):  # (8 + 1) // 3 facts fill each row
            e, a, v = inputs[3 * i] - 256, inputs[3 * i + 1] - 256 - 10, targets[3 * i + 1]
            assert int(v) - 256 - 14 == corpus.table[int(e), int(a)]
            assert int(e) * 4 + int(a) in first


def test_mixed_data_trains_the_second_set_when_asked_and_evaluates_both(tmp_path):
    data = mixed(tmp_path, text_fraction=0.0, train_second=True)
    batch = data.batch(np.random.default_rng(1), 4)
    facts = set()
    for row in batch.inputs:
        for i in range(3):
            facts.add(int(row[3 * i] - 256) * 4 + int(row[3 * i + 1] - 266))
    assert facts <= set(data.second.tolist())

    class Oracle(torch.nn.Module):
        """Logits that name the right value of every fact of the first set only."""

        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, data.vocab_size)
            if tokens.shape[1] != 2:  # a text window: uniform
                return logits
            first = set(data.first.tolist())
            for b, (e, a) in enumerate(tokens.tolist()):
                fact = (e - 256) * 4 + (a - 266)
                value = int(data.corpus.table[fact // 4, fact % 4])
                guess = value if fact in first else (value + 1) % 6
                logits[b, 1, 256 + 14 + guess] = 50.0
            return logits

    out = data.evaluate(Oracle(), batch_size=7, windows=4)
    assert out["recall_first"] == 1.0 and out["recall_second"] == 0.0
    assert out["recall"] == out["recall_second"]  # the trained set's
    assert out["bits_per_byte"] == out["val_bits_per_byte"] > 0


def test_bad_mixed_data_arguments_name_the_field(tmp_path):
    with pytest.raises(InvalidArgument, match="new_facts"):
        mixed(tmp_path, new_facts=0.001)  # leaves the second set empty
    with pytest.raises(InvalidArgument, match="text_fraction"):
        mixed(tmp_path, text_fraction=1.0)
    with pytest.raises(InvalidArgument, match="new_facts"):
        mixed(tmp_path, new_facts=None, train_second=True)
