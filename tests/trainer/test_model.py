"""trainer.model: the decoder transformer with memory layers.

The forward equals a float64 transformer written out here from the model's weights
(pre-norm attention with rotary positions, SwiGLU FFNs); a future token never changes
past logits; memory layers replace the chosen FFNs and share one table or get their own,
whose row gradients come from every layer reading it; each rank and micro-batch pushes
under its own push id and the pushes add up to one large batch; the seed fixes every
weight and value; the loss counts only masked positions; dense_equivalent matches the
memory layers' multiply-adds; a few steps lower the loss on facts; bad config keys and
values are refused by name.
"""

import math

import pytest
import torch

import memstore
from memstore import InvalidArgument, MemoryLayer, ShardTable
from memstore.trainer.data import Batch, FactsCorpus
from memstore.trainer.model import (
    FeedForward,
    ModelArgs,
    Transformer,
    dense_equivalent,
    ffn_slot_macs,
    table_specs,
)

TINY = dict(
    vocab_size=50,
    dim=32,
    n_layers=3,
    n_heads=2,
    max_seq_len=16,
    memory_layers=[0, 2],
    mem_heads=2,
    mem_k=4,
    mem_n_keys=8,
    mem_key_dim=16,
)


def tiny(**overrides) -> ModelArgs:
    return ModelArgs(**{**TINY, **overrides})


class RecordingTable:
    """A value table that also sums the dense row gradient of every push it gets."""

    def __init__(self, table: ShardTable):
        self.table = table
        self.rows, self.dim = table.rows, table.dim
        self.grad = torch.zeros(table.rows, table.dim)

    def lookup(self, idx, w):
        return self.table.lookup(idx, w)

    def backward(self, idx, w, dy, step=None, push_id=0):
        self.grad.index_add_(0, idx.flatten(), (w[..., None] * dy[:, None, :]).flatten(0, 1))
        return self.table.backward(idx, w, dy, step=step, push_id=push_id)

    def step(self, step=None):
        return self.table.step(step)


@pytest.mark.parametrize("memory_plus", [False, True])
@pytest.mark.parametrize("memory_layers", [[], [1]])
def test_forward_returns_logits_of_every_position(memory_plus, memory_layers):
    model = Transformer(tiny(memory_plus=memory_plus, memory_layers=memory_layers))
    logits = model(torch.randint(0, 50, (3, 7)))
    assert logits.shape == (3, 7, 50) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def _rms_norm64(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rotate64(x, theta):
    """Rotary embedding of x (B, heads, T, head_dim): the pair (x[2i], x[2i+1]) at
    position t turned by the angle t · theta^(-2i / head_dim)."""
    T, head_dim = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(head_dim // 2):
        angle = torch.arange(T, dtype=torch.float64) * theta ** (-2 * i / head_dim)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * angle.cos() - b * angle.sin()
        out[..., 2 * i + 1] = a * angle.sin() + b * angle.cos()
    return out


def _attention64(x, attn, n_heads, theta):
    """Causal multi-head attention written out: q, k, v from one (3·dim, dim) weight."""
    B, T, D = x.shape
    hd = D // n_heads
    q, k, v = (x @ attn.qkv.weight.double().T).split(D, dim=-1)
    q, k, v = (t.reshape(B, T, n_heads, hd).transpose(1, 2) for t in (q, k, v))
    q, k = _rotate64(q, theta), _rotate64(k, theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    y = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, D) @ attn.proj.weight.double().T


def _swiglu64(x, ffn):
    w1, w2, w3 = (lin.weight.double() for lin in (ffn.w1, ffn.w2, ffn.w3))
    a = x @ w1.T
    return (a * torch.sigmoid(a) * (x @ w3.T)) @ w2.T


def _transformer64(model, tokens):
    """The model's forward in float64 from its weights: pre-norm blocks
    h = x + attn(norm(x)), out = h + ffn(norm(h)); final norm, output. A memory layer
    (checked against its own oracle in tests/memstore/test_memory_layer.py) is called as
    it is, in float32, on the normed input this oracle computed."""
    args = model.args
    x = model.embed.weight.double()[tokens]
    for block in model.layers:
        h = x + _attention64(
            _rms_norm64(x, block.attn_norm.weight, args.norm_eps),
            block.attn,
            args.n_heads,
            args.rope_theta,
        )
        normed = _rms_norm64(h, block.ffn_norm.weight, args.norm_eps)
        if isinstance(block.ffn, FeedForward):
            x = h + _swiglu64(normed, block.ffn)
        else:
            x = h + block.ffn(normed.float()).double()
    return _rms_norm64(x, model.norm.weight, args.norm_eps) @ model.output.weight.double().T


@pytest.mark.parametrize("memory_layers", [[], [1]])
def test_forward_matches_a_float64_transformer_written_out(memory_layers):
    args = tiny(memory_layers=memory_layers, n_heads=4, layer_ffn_hidden=[40, 24, 56])
    model = Transformer(args)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # weights far from their init, norm gains far from 1
        for name, p in model.named_parameters():
            if name.startswith("layers.1.ffn.") and memory_layers:
                continue  # the memory layer keeps its own init
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    tokens = torch.randint(0, 50, (3, 11), generator=g)
    logits = model(tokens)
    expected = _transformer64(model, tokens)
    assert expected.std() > 1.0  # attention and FFNs far from a near-identity
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_a_future_token_does_not_change_past_logits():
    model = Transformer(tiny())
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 50
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=0)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_memory_layers_replace_the_ffn_of_the_chosen_layers():
    model = Transformer(tiny(memory_layers=[2, 0]))
    kinds = [type(block.ffn) for block in model.layers]
    assert kinds == [MemoryLayer, FeedForward, MemoryLayer]
    assert model.args.memory_layers == [0, 2]
    assert all(hasattr(m, "gate") for m in model.memory_layers())  # Memory+ by default
    pkm = Transformer(tiny(memory_plus=False))
    assert not any(hasattr(m, "gate") for m in pkm.memory_layers())


def test_shared_pool_is_one_table_and_per_layer_tables_are_distinct():
    shared = Transformer(tiny(shared_memory=True))
    assert shared.table_specs() == {"memory": (64, 32)}
    (table,) = shared.value_tables().values()
    assert all(m.table is table for m in shared.memory_layers())
    assert [m.push_id for m in shared.memory_layers()] == [0, 1]
    # keys and query nets stay per layer
    a, b = shared.memory_layers()
    assert a.keys is not b.keys and a.query is not b.query

    separate = Transformer(tiny(shared_memory=False, mem_value_dim=24))
    assert separate.table_specs() == {"memory.0": (64, 24), "memory.2": (64, 24)}
    tables = separate.value_tables()
    assert [m.table for m in separate.memory_layers()] == [tables["memory.0"], tables["memory.2"]]
    assert not torch.equal(tables["memory.0"].values, tables["memory.2"].values)


def test_shared_pool_applies_the_row_gradients_of_every_layer():
    args = tiny()
    ((rows, dim),) = table_specs(args).values()
    recording = RecordingTable(ShardTable(rows, dim, optimizer=memstore.SGD(lr=1.0)))
    model = Transformer(args, tables={"memory": recording})
    before = recording.table.values.clone()
    model(torch.randint(0, 50, (4, 9))).square().mean().backward()
    assert recording.table.pushes(1) == [0, 1]  # one push id per memory layer
    recording.step(1)
    assert recording.table.stats()["duplicate_pushes"] == 0
    torch.testing.assert_close(
        before - recording.table.values, recording.grad, rtol=1e-5, atol=1e-7
    )


def test_each_rank_pushes_under_its_own_push_ids():
    model = Transformer(tiny(n_layers=4, memory_layers=[0, 1, 3]), rank=2)
    assert model.pushes_per_rank() == {"memory": 3}
    assert [m.push_id for m in model.memory_layers()] == [6, 7, 8]
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    assert model.value_tables()["memory"].pushes(1) == [6, 7, 8]


def test_set_step_tags_the_pushes():
    model = Transformer(tiny(shared_memory=False))
    model.set_step(2)  # tables accept pushes at most two steps past the last applied one
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    assert all(t.pending_steps() == [2] for t in model.value_tables().values())


def test_tables_given_from_outside_must_match_the_specs():
    args = tiny()
    with pytest.raises(InvalidArgument) as e:
        Transformer(args, tables={"memory.0": ShardTable(64, 32)})
    assert e.value.field == "tables"
    with pytest.raises(InvalidArgument) as e:
        Transformer(args, tables={"memory": ShardTable(64, 16)})
    assert e.value.field == "table"
    table = ShardTable(64, 32)
    model = Transformer(args, tables={"memory": table})
    assert model.value_tables() == {"memory": table}
    assert Transformer(tiny(memory_layers=[])).value_tables() == {}


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(InvalidArgument, match="keys among") as e:
        ModelArgs.from_dict({**TINY, "n_head": 2, "memory_slots": 3})
    assert e.value.field == "model"
    assert e.value.got == "unknown keys model.memory_slots, model.n_head"
    assert ModelArgs.from_dict(tiny().to_dict()) == tiny()
    bad = [
        ({"n_heads": 3}, "n_heads"),
        ({"dim": 0}, "dim"),
        ({"memory_layers": [3]}, "memory_layers"),
        ({"memory_layers": [1, 1]}, "memory_layers"),
        ({"mem_k": 65}, "mem_k"),
        ({"mem_key_dim": 15}, "mem_key_dim"),
        ({"memory_plus": False, "mem_value_dim": 16}, "mem_value_dim"),
        ({"value_lr": 0.0}, "value_lr"),
        ({"vocab_size": True}, "vocab_size"),
        ({"layer_ffn_hidden": [8, 8]}, "layer_ffn_hidden"),
    ]
    for overrides, field in bad:
        with pytest.raises(InvalidArgument) as e:
            tiny(**overrides)
        assert e.value.field == field, overrides
    with pytest.raises(InvalidArgument) as e:
        Transformer(tiny(max_seq_len=4))(torch.zeros(1, 5, dtype=torch.long))
    assert e.value.field == "tokens"


def test_the_seed_fixes_every_initial_weight_and_value():
    a, b, c = (Transformer(tiny(seed=s)) for s in (1, 1, 2))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.embed.weight, c.embed.weight)
    assert a.value_tables()["memory"].fingerprint() == b.value_tables()["memory"].fingerprint()
    assert a.value_tables()["memory"].fingerprint() != c.value_tables()["memory"].fingerprint()


def test_loss_counts_only_the_masked_positions():
    model = Transformer(tiny(memory_layers=[]))
    inputs, targets = torch.randint(0, 50, (2, 2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = True
    logits = model(inputs)
    expected = (
        torch.nn.functional.cross_entropy(logits[0, 2], targets[0, 2])
        + torch.nn.functional.cross_entropy(logits[1, 5], targets[1, 5])
    ) / 2
    torch.testing.assert_close(model.loss(Batch(inputs, targets, mask)), expected)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model.loss(Batch(inputs, targets)), full)


@pytest.mark.parametrize("shared", [True, False])
def test_a_few_steps_reduce_the_loss_on_facts(shared):
    corpus = FactsCorpus(entities=32, attributes=2, values=8, seed=0)
    args = tiny(
        vocab_size=corpus.vocab_size,
        n_layers=2,
        memory_layers=[0, 1],
        shared_memory=shared,
        value_lr=1e-2,
        max_seq_len=2,
    )
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = corpus.batches(64, seed=0)
    first = model.loss(corpus.batch(torch.arange(corpus.n_facts).numpy())).item()
    for step in range(1, 41):
        model.set_step(step)
        loss = model.loss(next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for table in model.value_tables().values():
            table.step(step)
    last = model.loss(corpus.batch(torch.arange(corpus.n_facts).numpy())).item()
    assert first > 0.9 * math.log(corpus.vocab_size)
    assert last < 0.6 * first


def test_dense_equivalent_matches_the_memory_layers_compute():
    args = tiny(n_layers=4, memory_layers=[1, 3])
    dense = dense_equivalent(args)
    assert dense.memory_layers == [] and dense.n_layers == 4 and dense.dim == args.dim
    for i in range(4):
        if i in args.memory_layers:
            assert abs(ffn_slot_macs(dense, i) - ffn_slot_macs(args, i)) <= 1.5 * args.dim
        else:
            assert dense.layer_ffn_hidden[i] == args.ffn_hidden
    model = Transformer(dense)
    assert model.value_tables() == {} and model.table_specs() == {}
    assert model(torch.randint(0, 50, (1, 4))).shape == (1, 4, 50)
    assert dense_equivalent(dense) == dense


def test_micro_batches_push_under_their_own_ids_and_add_up():
    args = tiny()
    tokens = torch.randint(0, 50, (4, 9))
    whole = RecordingTable(ShardTable(64, 32, optimizer=memstore.SGD(lr=1.0)))
    Transformer(args, tables={"memory": whole})(tokens).square().sum().backward()
    parts = RecordingTable(ShardTable(64, 32, optimizer=memstore.SGD(lr=1.0)))
    model = Transformer(args, tables={"memory": parts}, rank=1, micro_batches=2)
    assert model.pushes_per_rank() == {"memory": 4}
    for micro, chunk in enumerate(tokens.chunk(2)):
        model.set_step(1, micro_batch=micro)
        model(chunk).square().sum().backward()
    assert parts.table.pushes(1) == [4, 5, 6, 7]
    before = parts.table.values.clone()
    parts.step(1)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(before - parts.table.values, whole.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgument) as e:
        model.set_step(2, micro_batch=2)
    assert e.value.field == "micro_batch"
