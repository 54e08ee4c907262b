"""Row statistics of a table: per row, the slots of the last counted step that read it
(tf), the counted steps that read it (df), and the number of steps counted.

Every count is compared with a plain numpy count of the pushed indices, on an
in-process ShardTable and on a distributed (2, 2) grid on a real local Ray instance;
the statistics and their named backgrounds survive a checkpoint, loaded into the same
grid and into another one. Pushes tagged with documents count documents (df: the
distinct documents of a step reading a row; steps: the documents), against plain Python
sets, in process and on a grid in sync and async mode; bad tags change nothing.
"""

import numpy as np
import pytest
import torch

import memstore
from memstore import InvalidArgument, checkpoint
from memstore.optim import SGD
from memstore.shard_table import BlockSpec, ShardTable

ROWS, DIM, B, M = 96, 128, 6, 4  # (2, 2) grids need 64 columns a block


def _push(step: int, push_id: int):
    """The (idx, w, dy) of one push; small row range so that rows repeat within a step."""
    g = torch.Generator().manual_seed(1000 * step + push_id)
    idx = torch.randint(0, ROWS, (B, M), generator=g)
    return idx, torch.rand(B, M, generator=g) + 0.1, torch.randn(B, DIM, generator=g)


class NumpyCounts:
    """The reference: tf, df and steps counted from the pushed indices with numpy."""

    def __init__(self):
        self.tf = np.zeros(ROWS, dtype=np.int64)
        self.df = np.zeros(ROWS, dtype=np.int64)
        self.steps = 0

    def count_step(self, pushes: list) -> None:
        self.tf = np.zeros(ROWS, dtype=np.int64)
        for idx, _, _ in pushes:
            np.add.at(self.tf, idx.numpy().ravel(), 1)
        self.df += self.tf > 0
        self.steps += 1

    def check(self, stats: dict) -> None:
        assert stats["steps"] == self.steps
        np.testing.assert_array_equal(stats["tf"], self.tf)
        np.testing.assert_array_equal(stats["df"], self.df)


def _train(table, steps, reference: NumpyCounts | None, pushes_per_step: int = 2):
    """Steps ``steps``: each with ``pushes_per_step`` pushes, a repeated push and a
    lookup (neither of which counts)."""
    for s in steps:
        pushes = [_push(s, p) for p in range(pushes_per_step)]
        for p, (idx, w, dy) in enumerate(pushes):
            table.backward(idx, w, dy, step=s, push_id=p)
        table.backward(*pushes[0], step=s, push_id=0)  # a retry: counted once
        table.lookup(*_push(s + 100, 0)[:2])  # a read: never counted
        table.step(s)
        if reference is not None:
            reference.count_step(pushes)


def _table(**kw) -> ShardTable:
    return ShardTable(ROWS, DIM, optimizer=SGD(lr=0.1), seed=3, **kw)


def test_counts_equal_a_numpy_count_of_the_pushed_slots():
    t, ref = _table(), NumpyCounts()
    ref.check(t.row_stats())  # nothing counted yet
    _train(t, [1, 2, 3], ref)
    ref.check(t.row_stats())
    assert ref.tf.max() > 1 and (ref.df > 1).any()  # repeated rows were exercised


def test_a_block_counts_its_rows_like_the_whole_table():
    whole, block, ref = _table(), _table(row_range=(32, 80)), NumpyCounts()
    for s in (1, 2):
        pushes = [_push(s, 0)]
        whole.backward(*pushes[0], step=s)
        idx, w, dy = pushes[0]
        inside = ((idx >= 32) & (idx < 80)).flatten()
        block.backward_csr(
            idx.flatten()[inside],
            w.flatten()[inside],
            torch.cat([torch.zeros(1, dtype=torch.int64), inside.view(B, M).sum(1).cumsum(0)]),
            dy,
            step=s,
        )
        whole.step(s)
        block.step(s)
        ref.count_step(pushes)
    stats = block.row_stats()
    np.testing.assert_array_equal(stats["tf"], ref.tf[32:80])
    np.testing.assert_array_equal(stats["df"], ref.df[32:80])


def test_the_switch_stops_and_restarts_counting():
    t, ref = _table(), NumpyCounts()
    _train(t, [1], ref)
    t.count_rows = False
    _train(t, [2], None)
    ref.check(t.row_stats())
    t.count_rows = True
    _train(t, [3], ref)
    ref.check(t.row_stats())


def test_a_snapshot_keeps_a_background_and_reset_starts_again():
    t, ref = _table(), NumpyCounts()
    _train(t, [1, 2], ref)
    t.snapshot_stats("pretraining")
    t.reset_stats()
    NumpyCounts().check(t.row_stats())
    after = NumpyCounts()
    _train(t, [3], after)
    after.check(t.row_stats())
    ref.check(t.row_stats("pretraining"))
    with pytest.raises(InvalidArgument) as e:
        t.row_stats("fine-tuning")
    assert e.value.field == "background"
    for bad in ("", "a/b", "x" * 65, 7):
        with pytest.raises(InvalidArgument) as e:
            t.snapshot_stats(bad)
        assert e.value.field == "name"


def test_statistics_live_in_the_state_dict_and_older_states_load_without_them():
    t, ref = _table(), NumpyCounts()
    _train(t, [1, 2], ref)
    t.snapshot_stats("pre")
    t.count_rows = False
    loaded = _table()
    loaded.load_state_dict(t.state_dict())
    ref.check(loaded.row_stats())
    ref.check(loaded.row_stats("pre"))
    assert loaded.count_rows is False
    older = {k: v for k, v in t.state_dict().items() if k != "row_stats"}
    loaded.load_state_dict(older)
    NumpyCounts().check(loaded.row_stats())
    assert loaded.count_rows is True
    bad = t.state_dict()
    bad["row_stats"]["df"] = bad["row_stats"]["df"][:-1]
    before = loaded.fingerprint()
    with pytest.raises(InvalidArgument) as e:
        loaded.load_state_dict(bad)
    assert e.value.field == "row_stats.df"
    assert loaded.fingerprint() == before


# ---- the distributed table -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ray_start_16_cpus, tmp_path_factory):
    """A (2, 2) grid trained 3 steps with the background "pre" after 2, its reference
    counts, and a checkpoint of it."""
    name = "row-stats-grid"
    t = memstore.create_table(
        name, ROWS, DIM, shards=(2, 2), optimizer=SGD(lr=0.1), seed=3, cpus_per_shard=0.5
    )
    try:
        pre, ref = NumpyCounts(), NumpyCounts()
        _train(t, [1, 2], pre)
        t.snapshot_stats("pre")
        ref.tf, ref.df, ref.steps = pre.tf.copy(), pre.df.copy(), pre.steps
        _train(t, [3], ref)
        path = t.save(str(tmp_path_factory.mktemp("ckpt") / "step-3"))
        yield t, pre, ref, path
    finally:
        memstore.drop_table(name)


def test_the_grid_counts_like_numpy_and_lookups_do_not_count(trained):
    t, pre, ref, _ = trained
    ref.check(t.row_stats())
    pre.check(t.row_stats("pre"))
    with pytest.raises(InvalidArgument) as e:
        t.row_stats("nope")
    assert e.value.field == "background"


def test_statistics_survive_a_checkpoint_loaded_into_another_grid(trained, table_names):
    t, pre, ref, path = trained
    for shards in [(2, 2), (4, 1)]:
        other = memstore.create_table(
            table_names("row-stats-restored"),
            ROWS,
            DIM,
            shards=shards,
            optimizer=SGD(lr=0.1),
            seed=3,
            restore_from=path,
            cpus_per_shard=0.5,
        )
        ref.check(other.row_stats())
        pre.check(other.row_stats("pre"))
        other.drop()


def test_a_checkpoint_block_cut_for_another_spec_carries_its_rows_statistics(trained):
    t, pre, ref, path = trained
    key = t.config.get("checkpoint_key")
    state = checkpoint.load_block(path, BlockSpec(ROWS, DIM, 20, 70, 0, DIM), key=key)
    block = _table(row_range=(20, 70))
    block.load_state_dict(state)
    stats = block.row_stats()
    np.testing.assert_array_equal(stats["tf"], ref.tf[20:70])
    np.testing.assert_array_equal(stats["df"], ref.df[20:70])
    np.testing.assert_array_equal(block.row_stats("pre")["df"], pre.df[20:70])


def test_the_grid_switch_and_reset(trained, table_names):
    t = memstore.create_table(
        table_names("row-stats-switch"),
        ROWS,
        DIM,
        shards=(2, 1),
        optimizer=SGD(lr=0.1),
        seed=3,
        cpus_per_shard=0.5,
    )
    ref = NumpyCounts()
    _train(t, [1], ref)
    t.set_row_counting(False)
    _train(t, [2], None)
    ref.check(t.row_stats())
    t.set_row_counting(True)
    t.reset_stats()
    ref = NumpyCounts()
    _train(t, [3], ref)
    ref.check(t.row_stats())
    with pytest.raises(InvalidArgument) as e:
        t.set_row_counting("yes")
    assert e.value.field == "enabled"


# ---- document tags -----------------------------------------------------------------------
def _doc_counts(steps: list) -> tuple[np.ndarray, int]:
    """df and N with documents, in plain Python: per step, the set of (row, document)
    pairs of its tagged bags; a document read in two steps counts in each."""
    df, n = np.zeros(ROWS, dtype=np.int64), 0
    for pushes in steps:
        pairs, docs = set(), set()
        for idx, _, _, tags in pushes:
            for b in range(idx.shape[0]):
                docs.add(int(tags[b]))
                pairs |= {(int(r), int(tags[b])) for r in idx[b]}
        for r, _ in pairs:
            df[r] += 1
        n += len(docs)
    return df, n


def _tagged_steps(first: int, count: int) -> list:
    """Two pushes a step; bags tagged with 3 documents shared by both pushes."""
    steps = []
    for s in range(first, first + count):
        g = torch.Generator().manual_seed(77 + s)
        tags = [torch.randint(0, 3, (B,), generator=g) + 10 * s for _ in (0, 1)]
        steps.append([(*_push(s, p), tags[p]) for p in (0, 1)])
    return steps


def _train_tagged(table, steps: list, first: int) -> None:
    for s, pushes in enumerate(steps, first):
        for p, (idx, w, dy, tags) in enumerate(pushes):
            table.backward(idx, w, dy, step=s, push_id=p, doc_ids=tags)
        table.step(s)


def test_tagged_pushes_count_documents_in_process():
    t = _table()
    steps = _tagged_steps(1, 3)
    _train_tagged(t, steps, 1)
    df, n = _doc_counts(steps)
    stats = t.row_stats()
    assert stats["steps"] == n and n > 3
    np.testing.assert_array_equal(stats["df"], df)
    assert (stats["df"] > 1).any()  # a row read by several documents of one step
    untagged = NumpyCounts()  # an untagged step afterwards counts one step, as before
    untagged.df, untagged.steps = df.copy(), n
    _train(t, [4], untagged)
    untagged.check(t.row_stats())


@pytest.mark.parametrize(
    "doc_ids, field",
    [
        (torch.tensor([0, 1]), "doc_ids"),  # not one per bag
        (torch.full((B,), -1), "doc_ids"),
        (torch.zeros(B, dtype=torch.float32), "doc_ids"),
        (torch.zeros(B, 1, dtype=torch.int64), "doc_ids"),
    ],
)
def test_bad_document_tags_are_refused_and_change_nothing(doc_ids, field):
    t = _table()
    before = t.fingerprint()
    with pytest.raises(InvalidArgument) as e:
        t.backward(*_push(1, 0), step=1, doc_ids=doc_ids)
    assert e.value.field == field
    assert t.pushes(1) == [] and t.fingerprint() == before


def test_every_push_of_a_step_is_tagged_or_none_is():
    t = _table()
    t.backward(*_push(1, 0), step=1, push_id=0, doc_ids=torch.zeros(B, dtype=torch.int64))
    with pytest.raises(InvalidArgument) as e:
        t.backward(*_push(1, 1), step=1, push_id=1)
    assert e.value.field == "doc_ids"
    t.backward(*_push(2, 0), step=2, push_id=0)
    with pytest.raises(InvalidArgument) as e:
        t.backward(*_push(2, 1), step=2, push_id=1, doc_ids=torch.zeros(B, dtype=torch.int64))
    assert e.value.field == "doc_ids"
    assert t.pushes(1) == [0] and t.pushes(2) == [0]


@pytest.mark.usefixtures("ray_start_16_cpus")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_grid_counts_tagged_documents_like_python(table_names, mode):
    t = memstore.create_table(
        table_names(f"row-stats-docs-{mode}"),
        ROWS,
        DIM,
        shards=(2, 2),
        optimizer=SGD(lr=0.1),
        seed=3,
        cpus_per_shard=0.25,
        mode=mode,
    )
    steps = _tagged_steps(1, 2)
    if mode == "sync":
        _train_tagged(t, steps, 1)
        df, n = _doc_counts(steps)
    else:  # every push is its own update: a step of one push
        for k, (idx, w, dy, tags) in enumerate([p for pushes in steps for p in pushes], 1):
            t.backward(idx, w, dy, step=k, doc_ids=tags)
        df, n = _doc_counts([[p] for pushes in steps for p in pushes])
    stats = t.row_stats()
    assert stats["steps"] == n
    np.testing.assert_array_equal(stats["df"], df)
    before = t.fingerprints()
    with pytest.raises(InvalidArgument) as e:
        t.backward(*steps[0][0][:3], step=9, doc_ids=torch.tensor([1]))
    assert e.value.field == "doc_ids" and t.fingerprints() == before
