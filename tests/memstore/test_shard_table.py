"""ShardTable: lookups and dw against F.embedding_bag in float64, pushes and steps,
validation. The optimizers' values against torch.optim are in test_optimizers_vs_torch."""

import pickle
import platform

import pytest
import torch
import torch.nn.functional as F

import memstore
from memstore import InvalidArgument, ShardTable, StepOutOfOrder, kernels
from memstore.shard_table import BlockSpec, initial_values

ROWS, DIM = 300, 41


def make(**kw):
    return ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=0.05), seed=3, **kw)


def batch(B=9, M=7, rows=ROWS, lo=0):
    idx = torch.randint(lo, rows, (B, M))
    return idx, torch.rand(B, M), torch.randn(B, DIM)


def embedding_bag64(values, idx, w, dy=None):
    """Oracle: the bag of values (any dtype) in float64, and with dy its dw."""
    v = values.double()
    w64 = w.double().requires_grad_()
    y = F.embedding_bag(idx, v, per_sample_weights=w64, mode="sum")
    if dy is None:
        return y.detach()
    y.backward(dy.double())
    return y.detach(), w64.grad


def test_lookup_matches_embedding_bag():
    t = make()
    idx, w, _ = batch()
    torch.testing.assert_close(
        t.lookup(idx, w), embedding_bag64(t.values, idx, w).float(), rtol=1e-5, atol=1e-5
    )


def test_initial_values_do_not_depend_on_the_grid():
    whole = initial_values(BlockSpec.whole(10_000, 8), 5, 1.0, torch.float32)
    block = initial_values(BlockSpec(10_000, 8, 4000, 9000, 2, 6), 5, 1.0, torch.float32)
    assert torch.equal(whole[4000:9000, 2:6], block)


def test_initial_values_are_normal_with_std_one_over_sqrt_dim():
    values = ShardTable(20_000, 64, seed=1).values
    assert abs(float(values.mean())) < 3e-3
    assert abs(float(values.std()) - 64**-0.5) < 0.01 * 64**-0.5


@pytest.mark.skipif(platform.system() != "Linux", reason="huge pages are asked for on Linux only")
def test_values_state_and_dense_gradients_sit_on_2mib_aligned_memory():
    """Values and optimizer state of a large block, and a large dense gradient, come
    from memstore.kernels.empty_table (2 MiB-aligned, advised for transparent huge pages)."""
    t = ShardTable(1 << 15, 128, optimizer=memstore.Adam())  # 16 MiB per tensor
    for tensor in (t.values, t.state["exp_avg"], t.state["exp_avg_sq"]):
        assert tensor.data_ptr() % (2 << 20) == 0
    rows = torch.arange(1 << 15)
    grads = kernels.SparseRowGrads.from_slots(
        rows, torch.ones(1 << 15), rows % 7, torch.randn(7, 128), num_rows=1 << 15
    )
    if kernels.row_grads.native_ok(grads.dy, dtypes=(torch.float32,)):
        assert grads.dense().data_ptr() % (2 << 20) == 0


def test_fingerprint_changes_with_any_value_or_state_bit():
    t = make()
    idx, w, dy = batch()
    t.backward(idx, w, dy, step=1)
    t.step(1)
    base = t.fingerprint()
    assert t.fingerprint() == base
    for tensor in (t.values, t.state["exp_avg_sq"]):
        bits = tensor.view(torch.int32)
        bits[7, 3] ^= 1  # one ulp
        assert t.fingerprint() != base
        bits[7, 3] ^= 1
        assert t.fingerprint() == base


def test_backward_returns_dw_of_embedding_bag_and_pends_until_step():
    t = make()
    for step in (1, 2, 3):
        idx, w, dy = batch()
        before = t.values.clone()
        dw = t.backward(idx, w, dy, step=step)
        torch.testing.assert_close(
            dw, embedding_bag64(before, idx, w, dy)[1].float(), rtol=1e-5, atol=1e-5
        )
        assert torch.equal(t.values, before) and t.pending_steps() == [step]
        assert t.step(step) == torch.unique(idx).numel()
        assert t.pending_steps() == []


def test_pushes_of_two_push_ids_sum_and_a_repeated_push_is_ignored():
    lr = 0.5
    t = ShardTable(ROWS, DIM, optimizer=memstore.SGD(lr=lr), seed=3)
    values = t.values.double().clone()
    idx, w, dy = batch()
    a, b = slice(0, 4), slice(4, 9)
    t.backward(idx[a], w[a], dy[a], step=1, push_id=0)
    t.backward(idx[b], w[b], dy[b], step=1, push_id=1)
    t.backward(idx[b], w[b], dy[b], step=1, push_id=1)  # a retry: never applied twice
    t.step(1)
    # SGD in float64: every slot of both pushes, once.
    grad = torch.zeros_like(values).index_add_(
        0, idx.flatten(), (w.double()[..., None] * dy.double()[:, None, :]).flatten(0, 1)
    )
    torch.testing.assert_close(t.values.double(), values - lr * grad, rtol=1e-5, atol=1e-6)
    assert t.stats()["duplicate_pushes"] == 1


def test_a_step_takes_the_lr_its_pushes_asked_for():
    """A schedule: pushes of step s carry s's lr; the table applies s with it, exactly
    like a table whose optimizer has that lr. Pushes that disagree are refused."""
    t = make()
    fixed = ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=0.02), seed=3)
    idx, w, dy = batch()
    t.backward(idx[:4], w[:4], dy[:4], step=1, push_id=0, lr=0.02)
    t.backward(idx[4:], w[4:], dy[4:], step=1, push_id=1, lr=0.02)
    before = t.pending_steps()
    with pytest.raises(InvalidArgument) as e:
        t.backward(idx, w, dy, step=1, push_id=2, lr=0.03)
    assert e.value.field == "lr" and t.pending_steps() == before
    fixed.backward(idx, w, dy, step=1)
    t.step(1)
    fixed.step(1)
    torch.testing.assert_close(t.values, fixed.values, rtol=1e-6, atol=1e-6)
    t.backward(idx, w, dy, step=2)
    t.step(2, lr=0.02)  # the step's own lr overrides, without touching the optimizer
    fixed.backward(idx, w, dy, step=2)
    fixed.step(2)
    torch.testing.assert_close(t.values, fixed.values, rtol=1e-6, atol=1e-6)
    assert t.optimizer.lr == 0.05


def _one_slot_at(idx: torch.Tensor, row: int) -> torch.Tensor:
    """idx with its first slot on ``row`` and the others where they were."""
    out = idx.clone()
    out[0, 0] = row
    return out


def test_the_first_and_last_rows_are_read_and_written():
    t = ShardTable(ROWS, DIM, optimizer=memstore.SGD(lr=0.5), seed=3)
    idx, w, dy = batch()
    idx[0, 0], idx[0, 1], idx[1, 0] = 0, ROWS - 1, ROWS - 1
    values = t.values.double().clone()
    y_ref, dw_ref = embedding_bag64(values, idx, w, dy)
    torch.testing.assert_close(t.lookup(idx, w), y_ref.float(), rtol=1e-5, atol=1e-5)
    edges = torch.tensor([0, ROWS - 1])
    torch.testing.assert_close(t.gather(edges).double(), values[edges], rtol=0, atol=0)
    torch.testing.assert_close(t.backward(idx, w, dy, step=1), dw_ref.float(), rtol=1e-5, atol=1e-5)
    t.step(1)
    grad = torch.zeros_like(values).index_add_(
        0, idx.flatten(), (w.double()[..., None] * dy.double()[:, None, :]).flatten(0, 1)
    )
    assert grad[0].abs().sum() > 0 and grad[ROWS - 1].abs().sum() > 0
    torch.testing.assert_close(t.values.double(), values - 0.5 * grad, rtol=1e-5, atol=1e-6)


def test_row_and_column_block_answers_its_part():
    whole = make()
    block = make(row_range=(100, 250), col_range=(5, 30))
    idx, w, dy = batch(lo=100, rows=250)
    idx[0, 0], idx[0, 1] = 100, 249  # the block's first and last rows
    expected = embedding_bag64(whole.values[:, 5:30], idx, w).float()
    torch.testing.assert_close(block.lookup(idx, w), expected, rtol=1e-5, atol=1e-5)
    for outside in (99, 250):
        with pytest.raises(InvalidArgument, match=r"idx: expected indices in \[100, 250\)"):
            block.lookup(_one_slot_at(idx, outside), w)


def test_bfloat16_table_lookup_and_dw_accumulate_in_float32():
    t = ShardTable(ROWS, DIM, dtype="bfloat16", optimizer=memstore.SGD(lr=0.1))
    assert t.values.dtype == torch.bfloat16
    idx, w, dy = batch()
    y_ref, dw_ref = embedding_bag64(t.values, idx, w, dy)
    y = t.lookup(idx, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.backward(idx, w, dy, step=1), dw_ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda t, i, w, d: t.lookup(i.float(), w), "idx"),
        (lambda t, i, w, d: t.lookup(_one_slot_at(i, -1), w), "idx"),
        (lambda t, i, w, d: t.lookup(_one_slot_at(i, ROWS), w), "idx"),
        (lambda t, i, w, d: t.backward(_one_slot_at(i, ROWS), w, d, step=2), "idx"),
        (lambda t, i, w, d: t.gather(torch.tensor([0, ROWS - 1, ROWS])), "rows"),
        (lambda t, i, w, d: t.gather(torch.tensor([-1, 0])), "rows"),
        (lambda t, i, w, d: t.lookup(i, w[:, :3]), "w"),
        (lambda t, i, w, d: t.lookup(i, w.masked_fill(w > 0.5, float("nan"))), "w"),
        (lambda t, i, w, d: t.backward(i, w, d[:, :5], step=2), "dy"),
        (lambda t, i, w, d: t.backward(i, w, d.masked_fill(d > 1, float("inf")), step=2), "dy"),
        (lambda t, i, w, d: t.backward(i, w, d, step=-1), "step"),
        (lambda t, i, w, d: t.backward(i, w, d, step=2, push_id=-2), "push_id"),
        (lambda t, i, w, d: t.backward(i, w, d, step=2, lr=float("nan")), "lr"),
        (lambda t, i, w, d: t.backward(i, w, d, step=2, lr=0.0), "lr"),
        (lambda t, i, w, d: t.step(2, lr=-1.0), "lr"),
        (lambda t, i, w, d: t.gather(i), "rows"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(call, field):
    t = make()
    idx, w, dy = batch()
    t.backward(idx, w, dy, step=1)
    t.step(1)
    before, pending = t.fingerprint(), t.pending_steps()
    with pytest.raises(InvalidArgument) as e:
        call(t, idx, w, dy)
    assert e.value.field == field
    assert t.fingerprint() == before and t.pending_steps() == pending


def test_a_step_from_the_past_is_refused():
    t = make()
    idx, w, dy = batch()
    t.backward(idx, w, dy, step=2)
    t.step(2)
    before = t.fingerprint()
    with pytest.raises(StepOutOfOrder) as e:
        t.backward(idx, w, dy, step=2)
    assert e.value.last_applied == 2
    with pytest.raises(StepOutOfOrder):
        t.step(1)
    assert t.fingerprint() == before


def test_state_dict_round_trip_continues_identically():
    a, b = make(), ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=0.05), seed=99)
    idx, w, dy = batch()
    a.backward(idx, w, dy, step=1)
    a.step(1)
    b.backward(idx, w, dy, step=1)  # pending gradients are not part of a state
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert a.fingerprint() == b.fingerprint() and b.pending_steps() == []
    for t in (a, b):
        t.backward(idx, w, dy, step=2)
        t.step(2)
    assert a.fingerprint() == b.fingerprint()


def test_every_optimizer_kind_has_the_state_it_declares():
    for opt in (
        memstore.SGD(),
        memstore.Adagrad(),
        memstore.RowWiseAdagrad(),
        memstore.Adam(),
        memstore.AdamW(),
    ):
        t = ShardTable(ROWS, DIM, optimizer=opt)
        assert set(t.state) == set(opt.kind.state_names())
        assert t.nbytes() == t.values.nbytes + opt.kind.state_bytes(ROWS, DIM)
        idx, w, dy = batch()
        t.backward(idx, w, dy)
        assert t.step() == torch.unique(idx).numel()


def _ragged(seed: int, lo: int, hi: int, B: int = 9):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.cat(
        [torch.zeros(1, dtype=torch.int64), torch.randint(0, 7, (B,), generator=g).cumsum(0)]
    )
    P = int(offsets[-1])
    rows = torch.randint(lo, hi, (P,), generator=g, dtype=torch.int64).to(torch.int32)
    rows[: P // 3] = rows[0]  # a row with many slots
    return rows, torch.rand(P, generator=g), offsets, torch.randn(B, DIM, generator=g)


def test_backward_with_the_senders_grouping_matches_float64_sgd():
    """A row block (rows [100, 250)) given the slots already grouped by row by the sender
    (what a table handle sends its column blocks): dw and the SGD step against float64
    sums, and the same bits as the block grouping the slots itself."""
    from memstore.grid import pack_grouping, unpack_grouping

    lr = 0.3
    blocks = [
        ShardTable(ROWS, DIM, optimizer=memstore.SGD(lr=lr), seed=3, row_range=(100, 250))
        for _ in range(2)
    ]
    rows, w, offsets, dy = _ragged(11, 100, 250)
    values = blocks[0].values.double().clone()
    grouping = unpack_grouping(pack_grouping(rows, 100, 250), rows.numel())
    dw = blocks[0].backward_csr(rows, w, offsets, dy, step=1, grouping=grouping)
    blocks[0].step(1)
    bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    local = rows.long() - 100
    expected_dw = (values[local] * dy.double()[bag]).sum(1)
    torch.testing.assert_close(dw.double(), expected_dw, rtol=1e-5, atol=1e-6)
    grad = torch.zeros_like(values).index_add_(0, local, w.double()[:, None] * dy.double()[bag])
    torch.testing.assert_close(blocks[0].values.double(), values - lr * grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(blocks[1].backward_csr(rows, w, offsets, dy, step=1), dw)
    blocks[1].step(1)
    assert blocks[0].fingerprint() == blocks[1].fingerprint()


@pytest.mark.parametrize(
    "field, spoil",
    [
        ("order", lambda u, s, o: (u, s, o + 1)),  # a position past the last slot
        ("order", lambda u, s, o: (u, s, o[:-1])),
        ("uniq", lambda u, s, o: (u + 150, s, o)),  # rows of another block
        ("seg", lambda u, s, o: (u, s[:-1], o)),
        ("seg", lambda u, s, o: (u, s.flip(0), o)),
    ],
)
def test_a_bad_grouping_is_refused_and_changes_nothing(field, spoil):
    from memstore.grid import pack_grouping, unpack_grouping

    t = ShardTable(ROWS, DIM, seed=3, row_range=(100, 250))
    rows, w, offsets, dy = _ragged(12, 100, 250)
    good = unpack_grouping(pack_grouping(rows, 100, 250), rows.numel())
    before = t.fingerprint()
    with pytest.raises(InvalidArgument) as e:
        t.backward_csr(rows, w, offsets, dy, step=1, grouping=spoil(*good))
    assert e.value.field == field
    assert t.fingerprint() == before and t.pending_steps() == []


def test_a_float64_value_beyond_float32_is_refused_where_a_cast_would_make_it_inf():
    t = make()
    idx, w, dy = batch()
    before = t.fingerprint()
    for field, call in [
        ("w", lambda: t.lookup(idx, w.double() * 1e39)),
        ("dy", lambda: t.backward(idx, w, dy.double() * 1e39, step=1)),
    ]:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == field
    assert t.fingerprint() == before and t.pending_steps() == []


def test_retract_withdraws_one_pending_push():
    t = make()
    (i0, w0, d0), (i1, w1, d1) = batch(), batch()
    t.backward(i0, w0, d0, step=1, push_id=0)
    t.backward(i1, w1, d1, step=1, push_id=1)
    assert t.retract(1, 1) and not t.retract(1, 1) and t.pushes(1) == [0]
    ref = make()
    ref.backward(i0, w0, d0, step=1, push_id=0)
    t.step(1)
    ref.step(1)
    assert t.fingerprint() == ref.fingerprint()
