"""Sparse pushes: the row budget of a table whose pushes apply its steps (async mode,
where every push is its own update, and ``step_on_push``).

Only the chosen rows change, against plain torch (SGD on a dense float64 copy, the other
rows' gradients masked) and a numpy TF-IDF written here; every other row's values and
optimizer state stay exactly as they were (Adam: the same fingerprints as one
in-process ShardTable stepping each push with the same choice). Bad budgets are refused
naming the field and change nothing in any shard.
"""

import math

import numpy as np
import pytest
import torch

import memstore
from memstore import InvalidArgument
from memstore.optim import SGD, Adam
from memstore.shard_table import ShardTable

ROWS, DIM, B, M, SEED, LR = 128, 128, 6, 4, 11, 0.5
PRETRAIN, TOP_T = 4, 7

pytestmark = pytest.mark.usefixtures("ray_start_16_cpus")


def _push(k: int):
    g = torch.Generator().manual_seed(500 + k)
    idx = torch.randint(0, ROWS, (B, M), generator=g)
    return idx, torch.rand(B, M, generator=g) + 0.1, torch.randn(B, DIM, generator=g)


def _dense_grad(values: torch.Tensor, idx, w, dy) -> torch.Tensor:
    v = values.detach().double().requires_grad_(True)
    ((w.double()[..., None] * v[idx]).sum(1) * dy.double()).sum().backward()
    return v.grad


def _numpy_top_t(background_pushes: list, idx: torch.Tensor, t: int) -> np.ndarray:
    """The t best rows of one push by tf · log((N + 1) / (df + 1)), ties by row id;
    every background push was one update (one document)."""
    df = np.zeros(ROWS, dtype=np.int64)
    for bg_idx, _, _ in background_pushes:
        df[np.unique(bg_idx.numpy())] += 1
    tf = np.bincount(idx.numpy().ravel(), minlength=ROWS)
    n = len(background_pushes)
    scored = sorted(
        (-(tf[r] * math.log((n + 1) / (df[r] + 1))), r) for r in range(ROWS) if tf[r] > 0
    )
    assert any(a[0] == b[0] for a, b in zip(scored, scored[1:])), "no tie to break"
    return np.array(sorted(r for _, r in scored[:t]))


def _create(name, shards, optimizer, **kw):
    return memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=shards,
        optimizer=optimizer,
        seed=SEED,
        cpus_per_shard=0.25,
        timeout_s=60,
        **kw,
    )


def _changed(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    return torch.nonzero((before != after).any(1)).flatten().numpy()


def _pretrain(t) -> list:
    pushes = [_push(k) for k in range(1, PRETRAIN + 1)]
    for k, push in enumerate(pushes, 1):
        t.backward(*push, step=k)
    t.snapshot_stats("pre")
    return pushes


@pytest.mark.parametrize("shards", [(1, 1), (2, 1), (2, 2)], ids=["1x1", "2x1", "2x2"])
def test_an_async_top_t_push_updates_the_numpy_tf_idf_rows_like_masked_torch_sgd(
    table_names, shards
):
    t = _create(table_names("async-top"), shards, SGD(lr=LR), mode="async")
    background = _pretrain(t)
    idx, w, dy = _push(PRETRAIN + 1)
    before = t.gather(torch.arange(ROWS))
    t.backward(idx, w, dy, step=PRETRAIN + 1, top_t=TOP_T, background="pre")
    after = t.gather(torch.arange(ROWS))
    chosen = _numpy_top_t(background, idx, TOP_T)
    np.testing.assert_array_equal(_changed(before, after), chosen)
    mask = torch.zeros(ROWS, dtype=torch.bool)
    mask[torch.from_numpy(chosen)] = True
    reference = before.double().clone()
    reference.grad = _dense_grad(before, idx, w, dy) * mask[:, None]
    torch.optim.SGD([reference], lr=LR).step()
    torch.testing.assert_close(after.double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(after[~mask], before[~mask])
    # Every push of the pretraining and the sparse one were counted (accesses, not updates).
    assert t.row_stats()["steps"] == PRETRAIN + 1


def test_async_adam_sparse_pushes_keep_the_other_rows_state_exactly(table_names):
    """Adam, explicit rows then top t: the blocks end bit for bit as one in-process block
    stepping each push on the same rows (values, moments and step counts)."""
    t = _create(table_names("async-adam"), (2, 1), Adam(lr=0.05), mode="async")
    reference = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=SEED)
    _pretrain(t)
    for k, push in enumerate([_push(k) for k in range(1, PRETRAIN + 1)], 1):
        reference.backward(*push, step=k)
        reference.step(k)
    reference.snapshot_stats("pre")
    explicit = torch.tensor([0, 5, 64, 70, 127])
    for k, kwargs in [
        (PRETRAIN + 1, {"rows": explicit}),
        (PRETRAIN + 2, {"top_t": TOP_T, "background": "pre"}),
        (PRETRAIN + 3, {"top_t": 2}),
    ]:
        push = _push(k)
        t.backward(*push, step=k, **kwargs)
        reference.backward(*push, step=k)
        reference.step(k, **kwargs)
    halves = [
        ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=SEED, row_range=rr)
        for rr in ((0, 64), (64, 128))
    ]
    sd = reference.state_dict()
    for half, (lo, hi) in zip(halves, ((0, 64), (64, 128))):
        part = half.state_dict()
        part["values"] = sd["values"][lo:hi]
        part["state"] = {k: v[lo:hi] for k, v in sd["state"].items()}
        part["last_step"], part["updates"] = sd["last_step"], sd["updates"]
        half.load_state_dict(part)
    assert list(t.fingerprints().values()) == [h.fingerprint() for h in halves]


def test_step_on_push_applies_the_union_of_its_pushes_budgets(table_names):
    t = _create(table_names("sop-sparse"), (2, 1), SGD(lr=LR), step_on_push=True, pushes_per_step=2)
    first, second = _push(1), _push(2)
    before = t.gather(torch.arange(ROWS))
    t.backward(*first, step=1, push_id=0, rows=torch.tensor([3, 90]))
    assert torch.equal(t.gather(torch.arange(ROWS)), before)  # pending until the last push
    t.backward(*second, step=1, push_id=1, top_t=3)
    after = t.gather(torch.arange(ROWS))
    tf = np.bincount(second[0].numpy().ravel(), minlength=ROWS)
    # No background (nothing counted yet): idf is log(1) = 0 for every row, so the
    # top 3 are the three lowest row ids the second push reads.
    top = np.flatnonzero(tf)[:3]
    touched = set(first[0].unique().tolist()) | set(second[0].unique().tolist())
    chosen = sorted((set(top.tolist()) | {3, 90}) & touched)
    np.testing.assert_array_equal(_changed(before, after), chosen)
    mask = torch.zeros(ROWS, dtype=torch.bool)
    mask[chosen] = True
    grad = _dense_grad(before, *first) + _dense_grad(before, *second)
    reference = before.double() - LR * grad * mask[:, None]
    torch.testing.assert_close(after.double(), reference, rtol=1e-6, atol=1e-6)


def test_bad_budgets_are_refused_naming_the_field_and_change_nothing(table_names):
    sync = _create(table_names("sync-budget"), (2, 1), SGD(lr=LR))
    with pytest.raises(InvalidArgument) as e:
        sync.backward(*_push(1), step=1, top_t=3)
    assert e.value.field == "top_t"
    assert sync.stats()["shards"][0]["pushes"] == 0
    t = _create(table_names("sop-budget"), (2, 1), SGD(lr=LR), step_on_push=True, pushes_per_step=2)
    _pretrain_step_on_push(t)
    t.backward(*_push(9), step=3, push_id=0, top_t=2)
    before, stats = t.fingerprints(), t.row_stats()
    for kwargs, field in [
        ({"rows": torch.tensor([0, ROWS])}, "rows"),
        ({"rows": [1.5]}, "rows"),
        ({"top_t": 0}, "top_t"),
        ({"top_t": True}, "top_t"),
        ({"top_t": 3, "background": "unknown"}, "background"),
        ({"background": "pre"}, "background"),
        ({"rows": torch.tensor([1]), "top_t": 3}, "top_t"),
        ({}, "rows"),  # the other push of step 3 carried a budget
    ]:
        with pytest.raises(InvalidArgument) as e:
            t.backward(*_push(10), step=3, push_id=1, **kwargs)
        assert e.value.field == field, kwargs
        assert t.fingerprints() == before
        np.testing.assert_array_equal(t.row_stats()["df"], stats["df"])
        assert [s["pushes"] for s in t.stats()["shards"]] == [5, 5]
    with pytest.raises(InvalidArgument) as e:
        t.step(3, top_t=2)
    assert e.value.field == "top_t"
    t.backward(*_push(10), step=3, push_id=1, top_t=2)  # the step is still there
    assert t.row_stats()["steps"] == 3


def _pretrain_step_on_push(t) -> None:
    for s in (1, 2):
        for p in (0, 1):
            t.backward(*_push(10 * s + p), step=s, push_id=p)
    t.snapshot_stats("pre")
