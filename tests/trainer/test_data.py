import math
from itertools import islice

import numpy as np
import pytest
import torch

from memstore import InvalidArgument
from trainer.data import Batch, ByteDataset, FactsCorpus, evaluate


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
        (e, corpus.entities + a) for e in range(13) for a in range(3))
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
