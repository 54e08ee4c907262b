"""Sparse steps: a step restricted to a set of rows, given explicitly or chosen as the
top t rows by TF-IDF of the step's accesses against a background.

Only the chosen rows change, against plain torch (SGD on a dense float64 copy with the
other rows' gradients masked; torch.optim.SparseAdam with a sparse gradient of the
chosen rows); every other row's values and optimizer state stay bit for bit. The top-t
choice is checked against a numpy TF-IDF written here, and is the same on 1, 2 and 4
row blocks and a (2, 2) grid (real local Ray, data channel and Ray paths) as on one
in-process ShardTable. A repeated sparse step (lost reply) applies once; bad inputs
are refused naming the field and change nothing.
"""

import math

import numpy as np
import pytest
import ray
import torch

import memstore
from memstore import InvalidArgument
from memstore._internal.shard_actor import ShardWorker
from memstore.optim import SGD, Adam
from memstore.shard_table import ShardTable

ROWS, DIM, B, M, SEED = 128, 128, 6, 4, 7  # (2, 2) grids need 64 columns a block
PRETRAIN, TOP_T = 3, 9


def _push(step: int, push_id: int = 0):
    g = torch.Generator().manual_seed(1000 * step + push_id)
    idx = torch.randint(0, ROWS, (B, M), generator=g)
    return idx, torch.rand(B, M, generator=g) + 0.1, torch.randn(B, DIM, generator=g)


def _pushes(step: int) -> list:
    return [_push(step, p) for p in range(2)]


# ---- plain references ------------------------------------------------------------------
def _dense_grad(values: torch.Tensor, pushes: list) -> torch.Tensor:
    """d/dV of Σ_pushes <Σ_m w·V[idx], dy>, by torch autograd in float64."""
    v = values.detach().double().requires_grad_(True)
    loss = sum(
        ((w.double()[..., None] * v[idx]).sum(1) * dy.double()).sum() for idx, w, dy in pushes
    )
    loss.backward()
    return v.grad


def _numpy_top_t(pre_batches: list, step_pushes: list, t: int) -> np.ndarray:
    """The t best rows by tf · log((N + 1) / (df + 1)), ties by row id, in numpy."""
    df = np.zeros(ROWS, dtype=np.int64)
    for pushes in pre_batches:
        read = np.zeros(ROWS, dtype=bool)
        for idx, _, _ in pushes:
            read[idx.numpy().ravel()] = True
        df += read
    tf = np.zeros(ROWS, dtype=np.int64)
    for idx, _, _ in step_pushes:
        np.add.at(tf, idx.numpy().ravel(), 1)
    n = len(pre_batches)
    scored = sorted(
        (-(tf[r] * math.log((n + 1) / (df[r] + 1))), r) for r in range(ROWS) if tf[r] > 0
    )
    assert any(a[0] == b[0] for a, b in zip(scored, scored[1:])), "no tie to break"
    return np.array(sorted(r for _, r in scored[:t]))


def _pretrain(table) -> list:
    """Steps 1..PRETRAIN of every touched row, then the background "pre"."""
    batches = []
    for s in range(1, PRETRAIN + 1):
        batches.append(_pushes(s))
        for p, push in enumerate(batches[-1]):
            table.backward(*push, step=s, push_id=p)
        table.step(s)
    table.snapshot_stats("pre")
    return batches


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    return torch.nonzero((before != after).any(1)).flatten().numpy()


# ---- in-process ------------------------------------------------------------------------
def test_sgd_on_explicit_rows_matches_torch_with_the_other_rows_masked():
    t = ShardTable(ROWS, DIM, optimizer=SGD(lr=0.5), seed=SEED)
    pushes = _pushes(1)
    for p, push in enumerate(pushes):
        t.backward(*push, step=1, push_id=p)
    before = t.values.clone()
    touched = np.unique(torch.cat([p[0].flatten() for p in pushes]).numpy())
    chosen = [int(touched[0]), int(touched[3]), int(touched[-1]), ROWS - 1]
    updated = t.step(1, rows=torch.tensor(chosen))
    assert updated == len(set(chosen) & set(touched.tolist()))
    reference = before.double().clone()
    mask = torch.zeros(ROWS, dtype=torch.bool)
    mask[chosen] = True
    reference.grad = _dense_grad(before, pushes) * mask[:, None]
    torch.optim.SGD([reference], lr=0.5).step()
    np.testing.assert_array_equal(
        _changed_rows(before, t.values), sorted(set(chosen) & set(touched))
    )
    torch.testing.assert_close(t.values.double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(t.values[~mask], before[~mask])  # bit for bit


def test_adam_on_explicit_rows_matches_sparse_adam_and_keeps_other_rows_state():
    t = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05, betas=(0.9, 0.99)), seed=SEED)
    reference = t.values.detach().clone().double().requires_grad_(True)
    torch_adam = torch.optim.SparseAdam([reference], lr=0.05, betas=(0.9, 0.99))
    for s, keep in [(1, slice(0, ROWS, 2)), (2, slice(1, ROWS, 3))]:
        pushes = _pushes(s)
        for p, push in enumerate(pushes):
            t.backward(*push, step=s, push_id=p)
        chosen = torch.arange(ROWS)[keep]
        grad = _dense_grad(t.values, pushes)
        rows = chosen[grad[chosen].abs().sum(1) > 0]
        before = {"values": t.values.clone(), **{k: v.clone() for k, v in t.state.items()}}
        t.step(s, rows=chosen)
        reference.grad = torch.sparse_coo_tensor(
            rows[None], grad[rows], reference.shape, check_invariants=True
        )
        torch_adam.step()
        others = torch.ones(ROWS, dtype=torch.bool)
        others[rows] = False
        for name, old in before.items():
            now = t.values if name == "values" else t.state[name]
            assert torch.equal(now[others], old[others]), name
        torch.testing.assert_close(t.values.double(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_top_t_chooses_the_numpy_tf_idf_rows_and_only_they_change():
    t = ShardTable(ROWS, DIM, optimizer=SGD(lr=0.5), seed=SEED)
    pre = _pretrain(t)
    step_pushes = _pushes(PRETRAIN + 1)
    for p, push in enumerate(step_pushes):
        t.backward(*push, step=PRETRAIN + 1, push_id=p)
    want = _numpy_top_t(pre, step_pushes, TOP_T)
    rows, scores = t.top_rows(PRETRAIN + 1, TOP_T, "pre")
    np.testing.assert_array_equal(np.sort(rows), want)
    assert list(scores) == sorted(scores, reverse=True)
    before = t.values.clone()
    assert t.step(PRETRAIN + 1, top_t=TOP_T, background="pre") == TOP_T
    np.testing.assert_array_equal(_changed_rows(before, t.values), want)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rows": torch.tensor([0, ROWS])}, "rows"),
        ({"rows": torch.tensor([-1])}, "rows"),
        ({"rows": torch.tensor([1.0])}, "rows"),
        ({"top_t": 0}, "top_t"),
        ({"top_t": True}, "top_t"),
        ({"top_t": 3, "background": "unknown"}, "background"),
        ({"background": "pre"}, "background"),
        ({"rows": torch.tensor([1]), "top_t": 3}, "top_t"),
    ],
)
def test_bad_sparse_steps_are_refused_in_process_and_change_nothing(kwargs, field):
    t = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=SEED)
    _pretrain(t)
    t.backward(*_push(PRETRAIN + 1), step=PRETRAIN + 1)
    before, stats = t.fingerprint(), t.row_stats()
    with pytest.raises(InvalidArgument) as e:
        t.step(PRETRAIN + 1, **kwargs)
    assert e.value.field == field
    assert t.fingerprint() == before
    assert t.pushes(PRETRAIN + 1) == [0]
    np.testing.assert_array_equal(t.row_stats()["df"], stats["df"])


# ---- the distributed table --------------------------------------------------------------
pytestmark_ray = pytest.mark.usefixtures("ray_start_16_cpus")


def _reference_table():
    """The in-process table and the rows it chose, trained as every grid below."""
    t = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=SEED)
    _pretrain(t)
    for p, push in enumerate(_pushes(PRETRAIN + 1)):
        t.backward(*push, step=PRETRAIN + 1, push_id=p)
    rows, _ = t.top_rows(PRETRAIN + 1, TOP_T, "pre")
    t.step(PRETRAIN + 1, top_t=TOP_T, background="pre")
    return t, np.sort(rows)


def _create(name, shards, **kw):
    return memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=shards,
        optimizer=Adam(lr=0.05),
        seed=SEED,
        cpus_per_shard=0.25,
        timeout_s=60,
        **kw,
    )


@pytestmark_ray
@pytest.mark.parametrize(
    "shards, channel",
    [
        ((1, 1), "socket"),
        ((2, 1), "socket"),
        ((4, 1), "socket"),
        ((2, 2), "socket"),
        ((2, 2), "ray"),
    ],
    ids=["1x1", "2x1", "4x1", "2x2", "2x2-ray"],
)
def test_a_grid_chooses_the_same_top_t_rows_as_one_in_process_table(table_names, shards, channel):
    reference, chosen = _reference_table()
    t = _create(table_names("sparse-grid"), shards, data_channel=channel)
    _pretrain(t)
    for p, push in enumerate(_pushes(PRETRAIN + 1)):
        t.backward(*push, step=PRETRAIN + 1, push_id=p)
    before = t.gather(torch.arange(ROWS))
    assert t.step(PRETRAIN + 1, top_t=TOP_T, background="pre") == TOP_T * shards[1]
    after = t.gather(torch.arange(ROWS))
    np.testing.assert_array_equal(_changed_rows(before, after), chosen)
    torch.testing.assert_close(after, reference.values.float(), rtol=1e-6, atol=1e-7)
    stats, ref_stats = t.row_stats(), reference.row_stats()
    np.testing.assert_array_equal(stats["df"], ref_stats["df"])
    np.testing.assert_array_equal(stats["tf"], ref_stats["tf"])


@pytestmark_ray
@pytest.mark.parametrize(
    "channel, max_pairs",
    [("socket", None), ("ray", None), ("socket", 30)],
    ids=["socket", "ray", "beyond-the-socket-caps"],
)
def test_explicit_rows_on_a_grid_change_only_those_rows(table_names, channel, max_pairs):
    """65 rows, 32 or 33 a row block: with max_pairs 30 (a push has 24 slots) the
    step goes over Ray, beyond the data channel's caps."""
    caps = {"max_pairs": max_pairs} if max_pairs else {}
    t = _create(table_names("sparse-rows"), (2, 2), data_channel=channel, **caps)
    pushes = _pushes(1)
    for p, push in enumerate(pushes):
        t.backward(*push, step=1, push_id=p)
    touched = np.unique(torch.cat([p[0].flatten() for p in pushes]).numpy())
    chosen = torch.cat([torch.arange(0, ROWS, 2), torch.tensor([ROWS - 1])])
    before = t.gather(torch.arange(ROWS))
    t.step(1, rows=chosen)
    want = sorted(set(chosen.tolist()) & set(touched.tolist()))
    np.testing.assert_array_equal(_changed_rows(before, t.gather(torch.arange(ROWS))), want)


class LosesStepReplies(ShardWorker):
    def drop_step_replies(self, n: int) -> None:
        self.data_server.faults.drop_replies("step", n)


@pytestmark_ray
def test_a_sparse_step_whose_reply_was_lost_applies_once(table_names):
    clean = _create(table_names("sparse-clean"), (2, 1))
    lossy = _create(table_names("sparse-lossy"), (2, 1), worker_cls=LosesStepReplies)
    for t in (clean, lossy):
        _pretrain(t)
        for p, push in enumerate(_pushes(PRETRAIN + 1)):
            t.backward(*push, step=PRETRAIN + 1, push_id=p)
    # The step goes through a new handle whose data channel waits 5 s for the lost reply
    # before the call is repeated over Ray (a handle's channel keeps the timeout it was
    # made with); the pretraining above kept 60 s, so no slow reply there is repeated.
    lossy_step = memstore.connect(lossy.name, timeout_s=5.0)
    ray.get(lossy.shards[(0, 0)].drop_step_replies.remote(1))
    assert lossy_step.step(PRETRAIN + 1, top_t=TOP_T, background="pre") == TOP_T
    clean.step(PRETRAIN + 1, top_t=TOP_T, background="pre")
    assert sum(s["replayed_steps"] for s in lossy.stats()["shards"]) == 2
    assert list(lossy.fingerprints().values()) == list(clean.fingerprints().values())


@pytestmark_ray
def test_bad_sparse_steps_on_a_grid_are_refused_naming_the_field(table_names):
    t = _create(table_names("sparse-bad"), (2, 1))
    _pretrain(t)
    for p, push in enumerate(_pushes(PRETRAIN + 1)):
        t.backward(*push, step=PRETRAIN + 1, push_id=p)
    before, stats = t.fingerprints(), t.row_stats()
    for kwargs, field in [
        ({"rows": torch.tensor([0, ROWS])}, "rows"),
        ({"rows": [1.5]}, "rows"),
        ({"top_t": 0}, "top_t"),
        ({"top_t": 3, "background": "unknown"}, "background"),
        ({"background": "pre"}, "background"),
        ({"rows": torch.tensor([1]), "top_t": 3}, "top_t"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            t.step(PRETRAIN + 1, **kwargs)
        assert e.value.field == field, kwargs
        assert t.fingerprints() == before
        np.testing.assert_array_equal(t.row_stats()["df"], stats["df"])
    assert t.step(PRETRAIN + 1, top_t=3, background="pre") == 3  # the step is still there
