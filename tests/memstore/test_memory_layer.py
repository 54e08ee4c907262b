"""MemoryLayer against the same layer written as one plain torch expression (dense
values, brute-force product-key top-k, autograd), forward and every gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import memstore
from memstore import InvalidArgument, MemoryLayer, MemoryLayerArgs, ShardTable
from memstore.kernels.reference import product_key_topk_reference

SMALL = dict(dim=24, heads=2, k=5, n_keys=9, key_dim=12)


def dense_layer(layer, x, values):
    """The layer's forward as plain torch on a dense, differentiable ``values``: query,
    optional RMS norm of the query halves and sub-keys, brute-force top-k (the spec),
    softmax, weighted sum of value rows, optional Memory+ gate and projection."""
    a = layer.args
    flat = x.reshape(-1, a.dim)
    q = layer.query(flat).view(-1, a.heads, 2, a.key_dim // 2)
    keys = layer.keys
    if a.qk_norm:
        q = F.rms_norm(q, (a.key_dim // 2,))
        keys = F.rms_norm(keys, (a.key_dim // 2,))
    scores, idx = product_key_topk_reference(q.reshape(-1, a.heads, a.key_dim), keys, a.k)
    w = torch.softmax(scores, -1).flatten(1)
    y = (values[idx.flatten(1)] * w[..., None]).sum(1)
    if a.memory_plus:
        y = layer.out(y * F.silu(layer.gate(flat)))
    return y.reshape(x.shape)


LAYERS = [
    pytest.param(dict(qk_norm=False), id="pkm"),
    pytest.param(dict(qk_norm=True), id="pkm-qk-norm"),
    pytest.param(dict(qk_norm=True, memory_plus=True, value_dim=16), id="memory-plus"),
]


@pytest.mark.parametrize("options", LAYERS)
def test_forward_and_every_gradient_equal_a_plain_torch_composition(options):
    """dy reaches the table (its row gradients, applied by SGD with lr 1, are the dense
    values' gradient) and dw continues into the scores, the keys and the query net."""
    args = MemoryLayerArgs(**SMALL, **options)
    table = ShardTable(81, args.value_dim, optimizer=memstore.SGD(lr=1.0), seed=2)
    layer = MemoryLayer(args, table=table)
    x = torch.randn(3, 7, SMALL["dim"])
    dense = table.values.clone().requires_grad_(True)
    expected = dense_layer(layer, x, dense)
    expected.sin().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    out = layer(x)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    out.sin().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert table.pending_steps() == [1]
    before = table.values.clone()
    table.step()
    torch.testing.assert_close(before - table.values, dense.grad, rtol=1e-5, atol=1e-6)


def test_recall_task_is_learned_well_below_chance():
    entities, classes, dim = 256, 16, 32
    x = torch.randn(entities, dim)
    labels = torch.randint(0, classes, (entities,))
    layer = MemoryLayer(
        MemoryLayerArgs(dim=dim, heads=2, k=8, n_keys=16, key_dim=16, value_lr=3e-2)
    )
    head = torch.nn.Linear(dim, classes)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-3)
    for step in range(1, 121):
        loss = F.cross_entropy(head(layer(x)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.table.step(step)
    assert loss.item() < 0.1 * math.log(classes)


def test_default_table_is_a_local_shard_table_with_lazy_adam_at_value_lr():
    args = MemoryLayerArgs(**SMALL, memory_plus=True, value_dim=16, value_lr=0.02, seed=4)
    table = MemoryLayer(args).table
    assert isinstance(table, ShardTable)
    assert (table.rows, table.dim) == (81, 16)
    assert table.optimizer == memstore.Adam(lr=0.02)
    assert torch.equal(table.values, ShardTable(81, 16, seed=4).values)


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


def test_layers_sharing_a_table_push_under_their_own_push_ids():
    shared = ShardTable(81, 24, optimizer=memstore.SGD(lr=1.0))
    layers = [MemoryLayer(MemoryLayerArgs(**SMALL), table=shared) for _ in range(2)]
    for i, layer in enumerate(layers):
        layer.push_id = i
    x = torch.randn(5, SMALL["dim"])
    layers[1](layers[0](x)).sum().backward()
    assert shared.pushes(1) == [0, 1]
