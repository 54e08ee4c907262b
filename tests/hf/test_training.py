"""transformers.Trainer trains the memory layers: the loss falls on every family, the
table steps once per optimizer step, and gradient accumulation (push ids of layers
sharing a table, over micro-batches) trains exactly as one large batch."""

import pytest
import torch
import transformers

from memstore import InvalidArgument, ShardTable
from memstore.hf import MemoryCallback, add_memory_layers, decoder_blocks

from .models import (
    FAMILIES,
    causal_lm_data,
    logged_losses,
    memory_args,
    tiny_model,
    training_args,
)


def _table(model, block: int = 1) -> ShardTable:
    return decoder_blocks(model)[block].mlp.memory.table.base


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trainer_run_lowers_the_loss(family, tmp_path):
    model = add_memory_layers(tiny_model(family), [1], memory_args(), mode="replace")
    before = _table(model).values.clone()
    trainer = transformers.Trainer(
        model,
        training_args(tmp_path, batch=8, steps=8),
        train_dataset=causal_lm_data(8),  # one batch, seen 8 times
        callbacks=[MemoryCallback()],
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    assert _table(model).last_step == 8 and not torch.equal(before, _table(model).values)


def _shared_table_run(tmp_path, batch: int, accumulate: int):
    """Two memory layers reading one table, trained 4 steps of 8 sequences."""
    model = tiny_model("llama")
    table = ShardTable(64, 32, seed=5)
    add_memory_layers(model, [0], memory_args(), mode="parallel", table=table)
    add_memory_layers(model, [1], memory_args(memory_plus=True), mode="replace", table=table)
    trainer = transformers.Trainer(
        model,
        training_args(tmp_path / f"{batch}", batch=batch, steps=4, accumulate=accumulate),
        train_dataset=causal_lm_data(32, seed=1),
        callbacks=[MemoryCallback()],
    )
    trainer.train()
    return logged_losses(trainer), table


def test_gradient_accumulation_trains_as_one_large_batch(tmp_path):
    whole_losses, whole = _shared_table_run(tmp_path, batch=8, accumulate=1)
    for batch, accumulate in ((4, 2), (2, 4)):
        losses, table = _shared_table_run(tmp_path, batch, accumulate)
        assert losses == pytest.approx(whole_losses, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(table.values, whole.values, rtol=1e-5, atol=1e-6)
        assert table.last_step == 4 and table.stats()["duplicate_pushes"] == 0


def test_a_second_run_goes_on_from_the_tables_last_step(tmp_path):
    model = add_memory_layers(tiny_model("qwen3"), [0], memory_args())
    for run in range(2):
        transformers.Trainer(
            model,
            training_args(tmp_path / f"{run}", batch=4, steps=3),
            train_dataset=causal_lm_data(12),
            callbacks=[MemoryCallback()],
        ).train()
    assert _table(model, 0).last_step == 6


def test_a_model_without_memory_layers_is_refused(tmp_path):
    trainer = transformers.Trainer(
        tiny_model("gpt2"),
        training_args(tmp_path, batch=4, steps=1),
        train_dataset=causal_lm_data(4),
        callbacks=[MemoryCallback()],
    )
    with pytest.raises(InvalidArgument, match="add_memory_layers"):
        trainer.train()


def test_mixed_precision_trains_with_the_values_in_the_tables_dtype(tmp_path):
    model = tiny_model("llama")
    add_memory_layers(model, [1], memory_args(memory_plus=True), mode="parallel")
    trainer = transformers.Trainer(
        model,
        training_args(tmp_path, batch=8, steps=6, bf16=True),  # autocast to bfloat16
        train_dataset=causal_lm_data(8),
        callbacks=[MemoryCallback()],
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < losses[0] - 0.1
    assert _table(model).values.dtype == torch.float32 and _table(model).last_step == 6
    half = add_memory_layers(tiny_model("qwen2").to(torch.bfloat16), [1], memory_args())
    ids = causal_lm_data(2)[0]["input_ids"][None]
    out = half(input_ids=ids, labels=ids)
    out.loss.backward()
    assert (
        out.logits.dtype == torch.bfloat16
        and half.model.layers[1].mlp.memory.keys.grad.dtype == torch.bfloat16
    )
