"""add_memory_layers on each family: the memory layer's forward and backward inside the
model equal a plain torch reference; "parallel" leaves the outputs unchanged, bit for
bit, before training; unsupported models and bad arguments are refused."""

import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

from memstore import SGD, InvalidArgument, ShardTable
from memstore.hf import MemoryMLP, add_memory_layers, decoder_blocks

from .models import FAMILIES, WIDTH, memory_args, reference_memory, tiny_model, tokens


def _sgd_table(args, seed=3):
    """lr 1 SGD: a step subtracts exactly the row gradients the table was pushed."""
    return ShardTable(args.n_keys**2, args.value_dim, optimizer=SGD(lr=1.0), seed=seed)


@pytest.mark.parametrize(
    "family, mode, memory_plus",
    [(f, "replace", False) for f in FAMILIES] + [(f, "parallel", True) for f in ("llama", "gpt2")],
)
def test_forward_and_backward_equal_a_plain_torch_reference(family, mode, memory_plus):
    args = memory_args(memory_plus=memory_plus, value_dim=48 if memory_plus else None)
    model = add_memory_layers(tiny_model(family), [1], args, mode=mode, table=_sgd_table(args))
    wrapper = decoder_blocks(model)[1].mlp
    memory = wrapper.memory
    if memory_plus:  # away from zero, so that the memory's part of the output counts
        nn.init.normal_(memory.out.weight, std=0.3)
    seen = {}

    def capture(module, inputs, output):
        seen["x"], seen["y"] = inputs[0].detach(), output
        output.register_hook(lambda g: seen.__setitem__("dy", g))

    wrapper.register_forward_hook(capture)
    ids = tokens(3, seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    values = memory.table.base.values.clone()
    memory.table.step(1)  # SGD, lr 1: values - row gradients

    query = memory.query.weight.detach().clone().requires_grad_()
    keys = memory.keys.detach().clone().requires_grad_()
    ref_values = values.clone().requires_grad_()
    extra = (memory.gate.weight.detach(), memory.out.weight.detach()) if memory_plus else ()
    y = reference_memory(seen["x"], query, keys, ref_values, args, *extra)
    if mode == "parallel":
        y = y + wrapper.mlp(seen["x"])
    torch.testing.assert_close(seen["y"].detach(), y.detach(), rtol=1e-5, atol=1e-6)
    (y * seen["dy"]).sum().backward()
    torch.testing.assert_close(memory.query.weight.grad, query.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(memory.keys.grad, keys.grad, rtol=1e-4, atol=1e-7)
    pushed = values - memory.table.base.values
    torch.testing.assert_close(pushed, ref_values.grad, rtol=1e-4, atol=1e-7)
    assert ref_values.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_memory_leaves_the_outputs_unchanged_bit_for_bit(family):
    model = tiny_model(family).eval()
    ids = tokens(2, seed=2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    add_memory_layers(model, [0], memory_args(), mode="parallel")  # PKM
    add_memory_layers(model, [1], memory_args(memory_plus=True), mode="parallel")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    blocks = decoder_blocks(model)
    assert all(isinstance(b.mlp, MemoryMLP) and b.mlp.mlp is not None for b in blocks)


def test_replace_puts_the_memory_layer_where_the_mlp_was():
    model = add_memory_layers(tiny_model("llama"), [0], memory_args(), mode="replace")
    mlp = decoder_blocks(model)[0].mlp
    assert isinstance(mlp, MemoryMLP) and mlp.mlp is None and mlp.out is None
    assert not isinstance(decoder_blocks(model)[1].mlp, MemoryMLP)


def test_layers_get_their_own_local_tables_or_share_one():
    own = add_memory_layers(tiny_model("qwen2"), [0, 1], memory_args())
    a, b = (blk.mlp.memory.table for blk in decoder_blocks(own))
    assert a is not b and not torch.equal(a.base.values, b.base.values)  # seeds differ
    shared = _sgd_table(memory_args())
    one = add_memory_layers(tiny_model("qwen2"), [0], memory_args(), table=shared)
    add_memory_layers(one, [1], memory_args(), mode="replace", table=shared)
    a, b = (blk.mlp.memory.table for blk in decoder_blocks(one))
    assert a is b and a.base is shared  # one view per table: distinct push ids


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(WIDTH, WIDTH)])


def test_an_unsupported_model_is_refused_naming_what_was_expected():
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2)
    )
    for model in (bert, t5, _Encoder()):
        with pytest.raises(InvalidArgument, match="ModuleList `layers` or `h`") as info:
            add_memory_layers(model, [0], memory_args())
        assert info.value.field == "model"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"layers": [2]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": [0, 0]}, "layers"),
        ({"layers": "0"}, "layers"),
        ({"mode": "beside"}, "mode"),
        ({"args": memory_args(dim=48)}, "args.dim"),
        ({"args": {"dim": WIDTH}}, "args"),
        ({"table": ShardTable(100, WIDTH)}, "table"),
        ({"table": [ShardTable(64, WIDTH)] * 2}, "table"),
        ({"table": "facts"}, "table"),
    ],
)
def test_bad_arguments_are_refused_and_change_nothing(kwargs, field):
    model = tiny_model("mistral")
    call = {"layers": [1], "args": memory_args(), **kwargs}
    with pytest.raises(InvalidArgument) as info:
        add_memory_layers(model, **call)
    assert info.value.field == field
    assert not any(isinstance(b.mlp, MemoryMLP) for b in decoder_blocks(model))
    assert not hasattr(model.config, "memstore")


def test_a_block_gets_one_memory_layer():
    model = add_memory_layers(tiny_model("gemma"), [1], memory_args())
    with pytest.raises(InvalidArgument, match="without a memory layer"):
        add_memory_layers(model, [0, 1], memory_args())
    assert not isinstance(decoder_blocks(model)[0].mlp, MemoryMLP)


def test_import_memstore_leaves_transformers_unimported():
    code = (
        "import sys, memstore; memstore.MemoryLayer, memstore.create_table; "
        "assert 'transformers' not in sys.modules and 'memstore.hf' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
