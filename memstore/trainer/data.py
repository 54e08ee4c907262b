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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from memstore import InvalidArgument
from memstore._internal.validation import check_positive_int

if TYPE_CHECKING:
    from .config import TrainArgs

__all__ = [
    "Batch",
    "ByteDataset",
    "FactsCorpus",
    "MixedData",
    "StepData",
    "evaluate",
    "fact_recall",
    "text_nll",
    "text_splits",
]


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    mask: torch.Tensor | None = None  # (B, T) bool: positions that count in the loss


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
            check_positive_int(name, getattr(self, name), 1)
        check_positive_int("seed", self.seed, 0)
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
        check_positive_int("batch_size", batch_size, 1)
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
    check_positive_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    values = corpus.value_tokens
    hits = hits_any = 0
    nll = 0.0
    for start in range(0, corpus.n_facts, batch_size):
        batch = corpus.batch(np.arange(start, min(start + batch_size, corpus.n_facts)))
        logits = model(batch.inputs)[:, 1].float()  # (N, vocab) at the value position
        answer = batch.targets[:, 1]
        hits += int(
            (logits[:, values.start : values.stop].argmax(-1) + values.start == answer).sum()
        )
        hits_any += int((logits.argmax(-1) == answer).sum())
        nll += float(F.cross_entropy(logits, answer, reduction="sum"))
    model.train(was_training)
    n = corpus.n_facts
    return {"facts": n, "recall": hits / n, "recall_any": hits_any / n, "nll": nll / n}


# ---- byte-level text ---------------------------------------------------------------


class ByteDataset:
    """Windows of a byte range of a file: vocabulary 256, token = byte.

    The file (any UTF-8 text; any bytes work) is memory-mapped, not read. The data set
    is the bytes ``[start, stop)`` of the file (default: all of it). A window of
    seq_len + 1 bytes at file offset o gives inputs bytes[o : o + seq_len] and targets
    bytes[o + 1 : o + seq_len + 1], every position counted; every window lies inside
    the range, so two data sets over disjoint ranges of one file never share a byte
    (:func:`text_splits`).
    """

    vocab_size = 256

    def __init__(
        self, path: str | os.PathLike, seq_len: int, start: int = 0, stop: int | None = None
    ):
        check_positive_int("seq_len", seq_len, 1)
        if not os.path.isfile(path):
            raise InvalidArgument("path", "an existing file", os.fspath(path))
        size = os.path.getsize(path)
        stop = size if stop is None else stop
        check_positive_int("start", start, 0)
        if isinstance(stop, bool) or not isinstance(stop, int) or not start <= stop <= size:
            raise InvalidArgument("stop", f"an int in [start={start}, size={size}]", stop)
        if stop - start < seq_len + 1:
            raise InvalidArgument(
                "path", f"at least seq_len + 1 = {seq_len + 1} bytes", f"{stop - start} bytes"
            )
        self.path, self.seq_len = os.fspath(path), seq_len
        self.start, self.stop = start, stop
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        """Number of distinct windows."""
        return self.stop - self.start - self.seq_len

    def sample_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n file offsets of windows drawn uniformly from the range's windows."""
        return self.start + rng.integers(0, len(self), size=n)

    def fixed_starts(self, n: int) -> np.ndarray:
        """min(n, len) file offsets of windows spread evenly over the range, first and
        last window included: the same every time (evaluation)."""
        check_positive_int("n", n, 1)
        return np.unique(
            np.linspace(self.start, self.start + len(self) - 1, min(n, len(self)))
            .round()
            .astype(np.int64)
        )

    def window(self, starts: np.ndarray) -> Batch:
        """The windows at file offsets ``starts`` (each inside the range)."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < self.start or starts.max() >= self.start + len(self)):
            raise InvalidArgument(
                "starts",
                f"offsets in [{self.start}, {self.start + len(self)})",
                f"[{starts.min()}, {starts.max()}]",
            )
        offsets = starts[:, None] + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(self.data[offsets].astype(np.int64))
        return Batch(chunk[:, :-1], chunk[:, 1:], None)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        """Endless batches of windows at uniform random offsets."""
        check_positive_int("batch_size", batch_size, 1)
        rng = np.random.default_rng(seed)
        while True:
            yield self.window(self.sample_starts(rng, batch_size))

    def bits_per_byte(self, loss_nats: float) -> float:
        return loss_nats / math.log(2)


def text_splits(
    path: str | os.PathLike,
    seq_len: int,
    val_path: str | os.PathLike | None = None,
    val_fraction: float | None = None,
) -> tuple[ByteDataset, ByteDataset | None]:
    """(train, validation) data sets of a text corpus.

    - ``val_path``: train on all of ``path``, validate on all of ``val_path``;
    - ``val_fraction`` f in (0, 1): the last f of ``path``'s bytes (from byte
      floor(size · (1 − f))) is held out for validation and the training windows stay
      entirely before it;
    - neither: no validation set (None).
    Errors name the argument: a missing file, a part shorter than one window
    (seq_len + 1 bytes), both sources given, or a fraction outside (0, 1).
    """
    if val_path is not None and val_fraction is not None:
        raise InvalidArgument("val_fraction", "unset when val_path is given", val_fraction)
    if val_fraction is None:
        train = ByteDataset(path, seq_len)
        if val_path is None:
            return train, None
        try:
            return train, ByteDataset(val_path, seq_len)
        except InvalidArgument as e:
            raise InvalidArgument(
                "val_path" if e.field == "path" else e.field, e.expected, e.got
            ) from None
    ok = (
        not isinstance(val_fraction, bool)
        and isinstance(val_fraction, (int, float))
        and 0 < val_fraction < 1
    )
    if not ok:
        raise InvalidArgument("val_fraction", "a number in (0, 1)", val_fraction)
    whole = ByteDataset(path, seq_len)  # the file exists and holds a window
    split = math.floor(whole.stop * (1 - val_fraction))
    need = seq_len + 1
    if split < need or whole.stop - split < need:
        raise InvalidArgument(
            "val_fraction",
            f"a split of the {whole.stop} bytes leaving "
            f"both parts at least seq_len + 1 = {need} bytes",
            val_fraction,
        )
    return ByteDataset(path, seq_len, 0, split), ByteDataset(path, seq_len, split)


@torch.no_grad()
def text_nll(
    model: torch.nn.Module, data: ByteDataset, starts: np.ndarray, batch_size: int = 1024
) -> float:
    """Mean next-byte NLL (nats) of the model over the windows at file offsets
    ``starts``, every position counted. The model's mode is restored afterwards."""
    check_positive_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        b = data.window(starts[i : i + batch_size])
        nll = F.cross_entropy(
            model(b.inputs).float().flatten(0, 1), b.targets.flatten(), reduction="sum"
        )
        total, count = total + float(nll), count + b.targets.numel()
    model.train(was_training)
    return total / count


# ---- facts mixed with text ---------------------------------------------------------


class MixedData:
    """Facts and byte text in one vocabulary: tokens [0, 256) are bytes, and the
    facts' tokens (:class:`FactsCorpus`'s) follow from 256.

    A batch of B rows holds round(B · ``text_fraction``) text windows of ``seq_len``
    bytes, every position scored, and then rows of facts: each packs
    (seq_len + 1) // 3 facts [entity, attribute, value] back to back (the rest of the
    row is byte 0), scored at the value positions only. The facts are split by a
    permutation seeded with the corpus seed: its last ``new_facts`` share is the second
    set, the rest the first; the batches draw from the first set, or from the second
    with ``train_second`` (teaching a model new facts). Evaluation reads each fact
    alone ([entity, attribute], as :func:`evaluate` does).
    """

    OFFSET = ByteDataset.vocab_size

    def __init__(
        self,
        corpus: FactsCorpus,
        text: ByteDataset,
        validation: ByteDataset | None,
        text_fraction: float,
        new_facts: float | None = None,
        train_second: bool = False,
    ):
        if text.seq_len < 2:
            raise InvalidArgument(
                "seq_len", "at least 2 (a fact's row packs 3 tokens)", text.seq_len
            )
        if not 0 <= text_fraction < 1:
            raise InvalidArgument("text_fraction", "a number in [0, 1)", text_fraction)
        order = np.random.default_rng(corpus.seed).permutation(corpus.n_facts)
        split = corpus.n_facts if new_facts is None else round(corpus.n_facts * (1 - new_facts))
        if not 0 < split <= corpus.n_facts or (new_facts is not None and split == corpus.n_facts):
            raise InvalidArgument(
                "new_facts",
                f"a share leaving both of {corpus.n_facts} facts' sets non-empty",
                new_facts,
            )
        self.first, self.second = np.sort(order[:split]), np.sort(order[split:])
        if train_second and not self.second.size:
            raise InvalidArgument("new_facts", "a share > 0 to train the second set", new_facts)
        self.corpus, self.text, self.validation = corpus, text, validation
        self.text_fraction, self.train_second = text_fraction, train_second
        self.vocab_size = self.OFFSET + corpus.vocab_size

    @property
    def trained(self) -> np.ndarray:
        """The fact ids the batches draw from."""
        return self.second if self.train_second else self.first

    def fact_rows(self, facts: np.ndarray) -> Batch:
        """Rows of (seq_len + 1) // 3 packed facts each (len(facts) a multiple of it)."""
        seq_len = self.text.seq_len
        per_row = (seq_len + 1) // 3
        seq = self.corpus.sequences(facts).reshape(-1, 3 * per_row) + self.OFFSET
        rows = torch.zeros(seq.shape[0], seq_len + 1, dtype=torch.int64)
        rows[:, : seq.shape[1]] = seq
        mask = torch.zeros(seq.shape[0], seq_len, dtype=torch.bool)
        mask[:, 1 : 3 * per_row : 3] = True  # input: the attribute; target: the value
        return Batch(rows[:, :-1], rows[:, 1:], mask)

    def batch(self, rng: np.random.Generator, size: int) -> Batch:
        """``size`` rows: the text windows first, then the rows of facts drawn uniformly
        with replacement from the trained set."""
        n_text = round(size * self.text_fraction)
        parts = []
        if n_text:
            window = self.text.window(self.text.sample_starts(rng, n_text))
            parts.append(window._replace(mask=torch.ones_like(window.targets, dtype=torch.bool)))
        if size > n_text:
            per_row = (self.text.seq_len + 1) // 3
            facts = self.trained[rng.integers(0, self.trained.size, size=(size - n_text) * per_row)]
            parts.append(self.fact_rows(facts))
        return Batch(*(torch.cat(t) for t in zip(*parts)))

    def evaluate(self, model: torch.nn.Module, batch_size: int, windows: int) -> dict:
        """``recall_first`` and ``recall_second`` (when there is a second set) with their
        ``nll_first`` and ``nll_second``; ``recall`` and ``nll`` of the trained set; bits
        per byte as :class:`StepData` reports them for text (``train_*``, ``val_*`` and
        the headline ``bits_per_byte``)."""
        out = {}
        for name, facts in (("first", self.first), ("second", self.second)):
            if facts.size:
                found = fact_recall(model, self.corpus, facts, self.OFFSET, batch_size)
                out[f"recall_{name}"], out[f"nll_{name}"] = found["recall"], found["nll"]
        trained = "second" if self.train_second else "first"
        out["recall"], out["nll"] = out[f"recall_{trained}"], out[f"nll_{trained}"]
        for part, data in (("train", self.text), ("val", self.validation)):
            if data is not None:
                nll = text_nll(model, data, data.fixed_starts(windows), batch_size)
                out[f"{part}_bits_per_byte"] = nll / math.log(2)
        head = "val" if self.validation is not None else "train"
        out["bits_per_byte"] = out[f"{head}_bits_per_byte"]
        return out


@torch.no_grad()
def fact_recall(
    model: torch.nn.Module,
    corpus: FactsCorpus,
    facts: np.ndarray,
    offset: int = 0,
    batch_size: int = 1024,
) -> dict:
    """``recall`` (argmax over the value tokens) and ``nll`` (nats, full softmax) of the
    facts ``facts``, each read alone as [entity, attribute], their tokens shifted by
    ``offset``. The model's mode is restored afterwards."""
    check_positive_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    first = corpus.value_tokens.start + offset
    hits, nll = 0, 0.0
    for start in range(0, len(facts), batch_size):
        seq = corpus.sequences(facts[start : start + batch_size]) + offset
        logits = model(seq[:, :2])[:, 1].float()
        answer = seq[:, 2]
        hits += int((logits[:, first : first + corpus.values].argmax(-1) + first == answer).sum())
        nll += float(F.cross_entropy(logits, answer, reduction="sum"))
    model.train(was_training)
    return {"recall": hits / max(len(facts), 1), "nll": nll / max(len(facts), 1)}


# ---- the data of a training run ----------------------------------------------------


class StepData:
    """The batch of every step of a run, a pure function of (seed, step): resuming at
    step s needs no data position beyond s. Errors name the config field."""

    def __init__(self, args: TrainArgs):
        self.args = args
        d = args.data
        if d.kind == "facts":
            self.corpus = FactsCorpus(d.entities, d.attributes, d.values, seed=d.seed)
            self.validation = None
            self.vocab_size = self.corpus.vocab_size
        elif d.kind == "mixed":
            self.corpus, self.validation = self._mixed(d), None
            self.vocab_size = self.corpus.vocab_size
        else:
            try:
                self.corpus, self.validation = text_splits(
                    d.path, d.seq_len, d.val_path, d.val_fraction
                )
            except InvalidArgument as e:
                raise InvalidArgument(f"data.{e.field}", e.expected, e.got) from None
            self.vocab_size = ByteDataset.vocab_size

    @staticmethod
    def _mixed(d) -> MixedData:
        facts = FactsCorpus(d.entities, d.attributes, d.values, seed=d.seed)
        try:
            text, validation = text_splits(d.path, d.seq_len, d.val_path, d.val_fraction)
            return MixedData(
                facts, text, validation, d.text_fraction, d.new_facts, d.train_facts == "second"
            )
        except InvalidArgument as e:
            raise InvalidArgument(f"data.{e.field}", e.expected, e.got) from None

    def global_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.args.seed, step])
        size = self.args.batch_size
        if isinstance(self.corpus, MixedData):
            return self.corpus.batch(rng, size)
        if isinstance(self.corpus, FactsCorpus):
            return self.corpus.batch(rng.integers(0, self.corpus.n_facts, size=size))
        return self.corpus.window(self.corpus.sample_starts(rng, size))

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Facts: :func:`evaluate`. Text: NLL and bits per byte on ``eval_windows``
        fixed windows of the training part (``train_*``) and of the validation data
        (``val_*``, when there is one); ``nll`` and ``bits_per_byte`` repeat the
        validation figures, or the training ones without validation data."""
        d = self.args.data
        model = _OnDevice(model)
        if isinstance(self.corpus, MixedData):
            return self.corpus.evaluate(model, d.eval_batch_size, d.eval_windows)
        if isinstance(self.corpus, FactsCorpus):
            return evaluate(model, self.corpus, batch_size=d.eval_batch_size)
        out = {}
        for part, data in (("train", self.corpus), ("val", self.validation)):
            if data is not None:
                nll = text_nll(model, data, data.fixed_starts(d.eval_windows), d.eval_batch_size)
                out[f"{part}_nll"], out[f"{part}_bits_per_byte"] = nll, nll / math.log(2)
        head = "val" if self.validation is not None else "train"
        out["nll"], out["bits_per_byte"] = out[f"{head}_nll"], out[f"{head}_bits_per_byte"]
        return out


class _OnDevice(torch.nn.Module):
    """The model, fed host tokens and answering on the host (evaluation on a GPU)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(tokens.to(device)).cpu()
