import math

import pytest
import torch
import torch.nn.functional as F

import memstore
from kernels.reference import bag_forward_reference, product_key_topk_reference
from memstore import InvalidArgument, MemoryLayer, MemoryLayerArgs, ShardTable

SMALL = dict(dim=24, heads=2, k=5, n_keys=9, key_dim=12)


def test_forward_equals_a_plain_torch_composition():
    layer = MemoryLayer(MemoryLayerArgs(**SMALL, qk_norm=False))
    x = torch.randn(3, 7, SMALL["dim"])
    flat = x.reshape(-1, SMALL["dim"])
    q = layer.query(flat).view(-1, 2, 12)
    scores, idx = product_key_topk_reference(q, layer.keys, 5)
    w = torch.softmax(scores, -1).flatten(1)
    expected = bag_forward_reference(layer.table.values, idx.flatten(1), w)
    torch.testing.assert_close(layer(x), expected.reshape(x.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_plus", [False, True])
def test_gradients_reach_query_keys_and_table(memory_plus):
    args = MemoryLayerArgs(**SMALL, memory_plus=memory_plus, value_dim=16 if memory_plus else None)
    layer = MemoryLayer(args)
    x = torch.randn(11, SMALL["dim"])
    layer(x).square().sum().backward()
    assert layer.query.weight.grad.abs().sum() > 0
    assert layer.keys.grad.abs().sum() > 0
    assert layer.table.pending_steps() == [1]
    assert layer.table.step() > 0


def test_value_gradients_equal_autograd_through_a_dense_table():
    layer = MemoryLayer(MemoryLayerArgs(**SMALL), table=ShardTable(81, 24, optimizer=memstore.SGD(lr=1.0)))
    x = torch.randn(6, SMALL["dim"])
    dense = layer.table.values.clone().requires_grad_(True)
    scores, idx = layer.topk(x)
    w = torch.softmax(scores, -1).flatten(1)
    (bag_forward_reference(dense, idx.flatten(1), w).sin().sum()).backward()
    before = layer.table.values.clone()
    layer(x).sin().sum().backward()
    layer.table.step()
    torch.testing.assert_close(before - layer.table.values, dense.grad, rtol=1e-5, atol=1e-6)


def test_recall_task_is_learned_well_below_chance():
    entities, classes, dim = 256, 16, 32
    x = torch.randn(entities, dim)
    labels = torch.randint(0, classes, (entities,))
    layer = MemoryLayer(MemoryLayerArgs(dim=dim, heads=2, k=8, n_keys=16, key_dim=16, value_lr=3e-2))
    head = torch.nn.Linear(dim, classes)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-3)
    for step in range(1, 121):
        loss = F.cross_entropy(head(layer(x)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.table.step(step)
    assert loss.item() < 0.1 * math.log(classes)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(InvalidArgument, match="keys among"):
        MemoryLayerArgs.from_dict({**SMALL, "topk": 3})
    with pytest.raises(InvalidArgument) as e:
        MemoryLayerArgs(**{**SMALL, "key_dim": 13})
    assert e.value.field == "key_dim"
    with pytest.raises(InvalidArgument) as e:
        MemoryLayerArgs(**SMALL, value_dim=8)
    assert e.value.field == "value_dim"
    with pytest.raises(InvalidArgument) as e:
        MemoryLayer(MemoryLayerArgs(**SMALL), table=ShardTable(80, 24))
    assert e.value.field == "table"


def test_wrong_input_width_is_refused_before_touching_the_table():
    layer = MemoryLayer(MemoryLayerArgs(**SMALL))
    with pytest.raises(InvalidArgument) as e:
        layer(torch.randn(4, 23))
    assert e.value.field == "x"
    assert layer.table.pending_steps() == []


def test_layers_sharing_a_table_push_under_their_own_worker_ids():
    shared = ShardTable(81, 24, optimizer=memstore.SGD(lr=1.0))
    layers = [MemoryLayer(MemoryLayerArgs(**SMALL), table=shared) for _ in range(2)]
    for i, layer in enumerate(layers):
        layer.worker = i
    x = torch.randn(5, SMALL["dim"])
    layers[1](layers[0](x)).sum().backward()
    assert shared.pushes(1) == [0, 1]
