"""save_pretrained writes the memory configuration and the tables beside the weights;
memstore.hf.from_pretrained rebuilds the model with its memory layers and the trained
tables: the logits are those of the saved model."""

import json

import pytest
import torch
import transformers

from memstore import InvalidArgument, ShardTable
from memstore.hf import MemoryCallback, add_memory_layers, from_pretrained, memory_mlps

from .models import FAMILIES, causal_lm_data, memory_args, tiny_model, tokens, training_args


def _trained(model, tmp_path, steps: int = 3, **overrides):
    """Trained a few steps, so that weights and values are not their initial ones."""
    transformers.Trainer(
        model,
        training_args(tmp_path / "run", batch=4, steps=steps, **overrides),
        train_dataset=causal_lm_data(12),
        callbacks=[MemoryCallback()],
    ).train()
    return model.eval()


def _tables(model) -> list:
    return [mlp.memory.table.base for _, mlp in memory_mlps(model)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_model_loads_with_its_memory_layers_and_tables(family, tmp_path):
    model = tiny_model(family)
    add_memory_layers(model, [0], memory_args(memory_plus=True), mode="parallel")
    add_memory_layers(model, [1], memory_args(seed=7), mode="replace")
    _trained(model, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert [g["mode"] for g in config["memstore"]["groups"]] == ["parallel", "replace"]
    loaded = from_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and not loaded.training
    ids = tokens(3, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for saved, restored in zip(_tables(model), _tables(loaded), strict=True):
        assert restored is not saved and restored.fingerprint() == saved.fingerprint()
        assert restored.last_step == 3


def test_a_trainer_checkpoint_holds_the_tables_and_training_goes_on_from_it(tmp_path):
    model = add_memory_layers(tiny_model("llama"), [1], memory_args())
    _trained(model, tmp_path, steps=2, save_strategy="steps", save_steps=2)
    loaded = from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert _tables(loaded)[0].fingerprint() == _tables(model)[0].fingerprint()
    _trained(loaded.train(), tmp_path / "again", steps=2)
    assert _tables(loaded)[0].last_step == 4


def test_a_shared_table_is_restored_shared_or_attached(tmp_path):
    table = ShardTable(64, 32, seed=2)
    model = add_memory_layers(tiny_model("gemma"), [0, 1], memory_args(), table=table)
    _trained(model, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    first, second = _tables(from_pretrained(tmp_path / "saved"))
    assert first is second and first.fingerprint() == table.fingerprint()
    attached = from_pretrained(tmp_path / "saved", table=table)
    assert all(t is table for t in _tables(attached))
    with pytest.raises(InvalidArgument, match="one per saved table"):
        from_pretrained(tmp_path / "saved", table=[table, table])


def test_what_is_not_a_memory_model_is_refused(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "plain")
    with pytest.raises(InvalidArgument, match="memstore") as info:
        from_pretrained(tmp_path / "plain")
    assert info.value.field == "path"
    model = add_memory_layers(tiny_model("qwen2"), [1], memory_args())
    model.save_pretrained(tmp_path / "saved")
    config_file = tmp_path / "saved" / "config.json"
    config = json.loads(config_file.read_text())
    config["memstore"]["tables"][0]["checkpoint"] = "../elsewhere"
    config_file.write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="inside it"):
        from_pretrained(tmp_path / "saved")
