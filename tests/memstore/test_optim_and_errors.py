"""The optimizer options (memstore.optim) and the error hierarchy (memstore.errors).

Options round-trip through their dict form, bad options are refused naming the field,
and each kind's optimizer state is the bytes per row counted by hand here. Every error
is a MemstoreError (InvalidArgument and StepOutOfOrder are also ValueErrors) and
pickles with its data, as it must to cross Ray.
"""

import pickle

import pytest

import memstore
from memstore.errors import (
    InvalidArgument,
    MemoryBudgetExceeded,
    ShardUnavailable,
    StepOutOfOrder,
    StoreRolledBack,
    TableNotFound,
)
from memstore.optim import OptimizerKind, optimizer_from_dict


@pytest.mark.parametrize(
    "opt",
    [
        memstore.SGD(lr=0.5, weight_decay=0.1),
        memstore.Adagrad(),
        memstore.RowWiseAdagrad(),
        memstore.Adam(betas=(0.8, 0.9)),
        memstore.AdamW(weight_decay=0.2),
    ],
)
def test_optimizer_dict_round_trip(opt):
    assert optimizer_from_dict(opt.to_dict()) == opt


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: memstore.Adam(lr=0), "lr"),
        (lambda: memstore.Adam(lr=float("nan")), "lr"),
        (lambda: memstore.Adam(betas=(0.9, 1.0)), "betas"),
        (lambda: memstore.AdamW(weight_decay=-1), "weight_decay"),
        (lambda: memstore.Adagrad(eps=0), "eps"),
        (lambda: optimizer_from_dict({"kind": "lion"}), "optimizer.kind"),
        (lambda: optimizer_from_dict({"kind": "adam", "momentum": 0.9}), "optimizer"),
    ],
)
def test_bad_optimizer_options_name_the_field(make, field):
    with pytest.raises(InvalidArgument) as e:
        make()
    assert e.value.field == field


def test_kind_metadata():
    assert OptimizerKind.ROWWISE_ADAGRAD.state_bytes(10, 8) == 40
    assert OptimizerKind.ADAM.state_bytes(10, 8) == 2 * 4 * 80
    assert OptimizerKind.SGD.state_names() == ()


@pytest.mark.parametrize(
    "err",
    [
        InvalidArgument("idx", "int64", "float32"),
        StepOutOfOrder(3, 5),
        TableNotFound("facts", ["other"]),
        StoreRolledBack(7, "facts/0"),
        ShardUnavailable("facts/1", 2.5, "actor died"),
        MemoryBudgetExceeded(100, 10, "node memory"),
    ],
)
def test_errors_pickle_with_their_data(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__
    assert isinstance(back, memstore.MemstoreError)


def test_error_hierarchy_as_documented():
    """One hierarchy: every memstore error is a MemstoreError; InvalidArgument is also a
    ValueError (callers catching ValueError keep working) and StepOutOfOrder is one."""
    for name in (
        "InvalidArgument",
        "StepOutOfOrder",
        "TableNotFound",
        "TableExists",
        "StoreRolledBack",
        "ShardUnavailable",
        "MemoryBudgetExceeded",
        "CheckpointError",
    ):
        assert issubclass(getattr(memstore, name), memstore.MemstoreError), name
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(StepOutOfOrder, InvalidArgument)
    e = InvalidArgument("idx", "int64", "float32")
    assert (e.field, e.expected, e.got) == ("idx", "int64", "float32")
    assert "idx" in str(e) and "int64" in str(e)
