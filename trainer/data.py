"""Data sets of the trainer: a synthetic factual-recall corpus and byte-level text.

Both yield :class:`Batch` (inputs, targets, mask) of int64 token tensors for next-token
prediction: ``targets[:, t]`` is the token after ``inputs[:, t]``, and the loss counts
only the positions where ``mask`` is True (every position when ``mask`` is None).
Every random choice comes from a ``numpy.random.Generator`` seeded by the caller, so
the same seed gives the same batches on every machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from memstore import InvalidArgument

__all__ = ["Batch", "FactsCorpus", "evaluate", "ByteDataset"]


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    mask: torch.Tensor | None = None  # (B, T) bool: positions that count in the loss


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(name, f"an int >= {minimum}", value)


# ---- factual recall ----------------------------------------------------------------

@dataclasses.dataclass
class FactsCorpus:
    """E entities × A attributes, each fact's value drawn uniformly from V values.

    One token per entity, per attribute and per value, in disjoint ranges:
    entities [0, E), attributes [E, E+A), values [E+A, E+A+V). A fact is the sequence
    [entity, attribute, value]; the model reads [entity, attribute] and is scored only
    on predicting the value (the target at position 1). There is no BOS token: the
    entity is never a target.
    """

    entities: int
    attributes: int
    values: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("entities", "attributes", "values"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        rng = np.random.default_rng(self.seed)
        self.table = rng.integers(0, self.values, size=(self.entities, self.attributes))

    @property
    def vocab_size(self) -> int:
        return self.entities + self.attributes + self.values

    @property
    def n_facts(self) -> int:
        return self.entities * self.attributes

    @property
    def value_tokens(self) -> range:
        first = self.entities + self.attributes
        return range(first, first + self.values)

    def sequences(self, facts: np.ndarray | None = None) -> torch.Tensor:
        """(N, 3) int64 [entity, attribute, value] of the given fact ids (default all,
        in order); fact id f is entity f // A, attribute f % A."""
        if facts is None:
            facts = np.arange(self.n_facts)
        e, a = np.divmod(np.asarray(facts, dtype=np.int64), self.attributes)
        v = self.table[e, a]
        seq = np.stack([e, self.entities + a, self.entities + self.attributes + v], axis=1)
        return torch.from_numpy(seq.astype(np.int64))

    def batch(self, facts: np.ndarray) -> Batch:
        seq = self.sequences(facts)
        mask = torch.zeros(seq.shape[0], 2, dtype=torch.bool)
        mask[:, 1] = True
        return Batch(seq[:, :2], seq[:, 1:], mask)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        """Endless batches of facts drawn uniformly with replacement."""
        _check_int("batch_size", batch_size, 1)
        rng = np.random.default_rng(seed)
        while True:
            yield self.batch(rng.integers(0, self.n_facts, size=batch_size))


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: FactsCorpus, batch_size: int = 1024) -> dict:
    """Recall of every fact of the corpus, in order.

    - ``recall``: fraction of facts whose argmax over the V value tokens at the value
      position is the right value (restricted: chance is 1/V);
    - ``recall_any``: the same with the argmax over the whole vocabulary;
    - ``nll``: mean negative log-likelihood (nats) of the right value under the full
      softmax, the quantity the training loss averages.
    The model is put in eval mode for the pass and restored afterwards.
    """
    _check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    values = corpus.value_tokens
    hits = hits_any = 0
    nll = 0.0
    for start in range(0, corpus.n_facts, batch_size):
        batch = corpus.batch(np.arange(start, min(start + batch_size, corpus.n_facts)))
        logits = model(batch.inputs)[:, 1].float()  # (N, vocab) at the value position
        answer = batch.targets[:, 1]
        hits += int((logits[:, values.start: values.stop].argmax(-1) + values.start
                     == answer).sum())
        hits_any += int((logits.argmax(-1) == answer).sum())
        nll += float(F.cross_entropy(logits, answer, reduction="sum"))
    model.train(was_training)
    n = corpus.n_facts
    return {"facts": n, "recall": hits / n, "recall_any": hits_any / n, "nll": nll / n}


# ---- byte-level text ---------------------------------------------------------------

class ByteDataset:
    """Random windows of a file's bytes: vocabulary 256, token = byte.

    The file (any UTF-8 text; any bytes work) is memory-mapped, not read. A window of
    seq_len + 1 bytes starting at a uniform offset gives inputs window[:-1] and
    targets window[1:], every position counted.
    """

    vocab_size = 256

    def __init__(self, path: str | os.PathLike, seq_len: int):
        _check_int("seq_len", seq_len, 1)
        size = os.path.getsize(path)
        if size < seq_len + 1:
            raise InvalidArgument("path", f"a file of at least seq_len + 1 = {seq_len + 1} "
                                  "bytes", f"{size} bytes")
        self.path, self.seq_len = os.fspath(path), seq_len
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        """Number of distinct windows."""
        return len(self.data) - self.seq_len

    def window(self, starts: np.ndarray) -> Batch:
        offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(self.data[offsets].astype(np.int64))
        return Batch(chunk[:, :-1], chunk[:, 1:], None)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        """Endless batches of windows at uniform random offsets."""
        _check_int("batch_size", batch_size, 1)
        rng = np.random.default_rng(seed)
        while True:
            yield self.window(rng.integers(0, len(self), size=batch_size))

    def bits_per_byte(self, loss_nats: float) -> float:
        return loss_nats / math.log(2)
