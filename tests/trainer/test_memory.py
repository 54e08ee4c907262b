"""trainer.memory: push ids for every backward of a step, and MemoryPushes.

Push ids of every (rank, layer, micro-batch) are distinct and fill pushes_per_step
exactly, against the formula (rank · m + micro_batch) · n + layer enumerated here; bad
arguments name the field; MemoryPushes numbers the layers of each table and tags the
step; one rank needs no gradient hook.
"""

import itertools

import pytest
import torch

import memstore
from memstore import InvalidArgument, MemoryLayer, MemoryLayerArgs
from memstore.trainer.memory import MemoryPushes, push_id, pushes_per_step, sum_dense_gradients

ARGS = MemoryLayerArgs(dim=8, heads=1, k=2, n_keys=4, key_dim=4)


def test_push_ids_are_distinct_for_every_backward_of_a_step_and_fill_the_count():
    world, layers, micro = 3, 2, 4
    ids = [
        push_id(r, i, m, layers=layers, micro_batches=micro)
        for r, i, m in itertools.product(range(world), range(layers), range(micro))
    ]
    assert sorted(ids) == list(range(pushes_per_step(world, layers, micro)))
    assert push_id(2, 1, 3, layers=2, micro_batches=4) == (2 * 4 + 3) * 2 + 1
    for kwargs, field in [
        ({"rank": -1}, "rank"),
        ({"rank": 0, "layer": 2, "layers": 2}, "layer"),
        ({"rank": 0, "micro_batch": 1}, "micro_batch"),
        ({"rank": 0, "layers": 0}, "layers"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            push_id(**kwargs)
        assert e.value.field == field
    with pytest.raises(InvalidArgument, match="world_size"):
        pushes_per_step(0)


def test_memory_pushes_number_the_layers_of_each_table_and_tag_the_step():
    shared = memstore.ShardTable(16, 8)
    own = memstore.ShardTable(16, 8)
    layers = [
        MemoryLayer(ARGS, table=shared),
        MemoryLayer(ARGS, table=own),
        MemoryLayer(ARGS, table=shared),
    ]
    pushes = MemoryPushes(layers, rank=1, micro_batches=2)
    pushes.set_step(2, micro_batch=1, value_lr=0.1)
    # shared: 2 layers, so rank 1 micro-batch 1 is slot 3 of 2: ids 6 and 7; own: slot 3
    assert [m.push_id for m in layers] == [6, 3, 7]
    assert {m.step for m in layers} == {2} and {m.value_lr for m in layers} == {0.1}
    assert [pushes.per_rank(m) for m in layers] == [4, 2, 4]
    x = torch.randn(3, 8)
    sum(m(x).sum() for m in layers).backward()
    assert shared.pushes(2) == [6, 7] and own.pushes(2) == [3]
    with pytest.raises(InvalidArgument, match="layers"):
        MemoryPushes([torch.nn.Linear(2, 2)], rank=0)


def test_one_rank_needs_no_gradient_hook():
    model = torch.nn.Linear(2, 2)
    assert sum_dense_gradients(model) is model
