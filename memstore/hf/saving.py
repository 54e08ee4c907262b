"""Save and load a Hugging Face model with memory layers.

``add_memory_layers`` records what it added in ``model.config.memstore`` (written
into config.json by ``save_pretrained``) and gives the model a ``save_pretrained``
that also writes each value table beside the weights, as a store checkpoint
(``memstore/table-<i>/``, the format ``memstore.load_table`` loads on any grid)::

    {"version": 1,
     "groups": [{"layers": [1], "mode": "parallel", "args": {...MemoryLayerArgs...}}],
     "tables": [{"checkpoint": "memstore/table-0", "store": "facts" or null}],
     "block_tables": [[1, 0]]}          # (block index, table index)

:func:`from_pretrained` rebuilds the model from config.json, adds the memory layers
again and loads the weights; the tables are restored into local ShardTables, or the
caller attaches its own (e.g. ``memstore.load_table(path + "/memstore/table-0", ...)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types

from torch import nn

from memstore import checkpoint
from memstore.errors import InvalidArgument
from memstore.memory_layer import MemoryLayerArgs
from memstore.optim import optimizer_from_dict
from memstore.shard_table import ShardTable

from .layers import PushScaledTable, add_memory_layers, memory_mlps

__all__ = ["from_pretrained", "save_pretrained"]

CONFIG_KEY = "memstore"
FORMAT_VERSION = 1
TABLES_DIR = "memstore"


def record_memory_config(model: nn.Module, layers: list[int], args: MemoryLayerArgs, mode: str):
    """Note a group of added memory layers in the model's config, and give the model
    the ``save_pretrained`` that also saves the tables."""
    memory = dict(getattr(model.config, CONFIG_KEY, None) or {"version": FORMAT_VERSION})
    group = {"layers": list(layers), "mode": mode, "args": dataclasses.asdict(args)}
    memory["groups"] = [*memory.get("groups", []), group]
    setattr(model.config, CONFIG_KEY, memory)
    if "save_pretrained" not in vars(model):
        # An instance attribute: Trainer checkpoints call model.save_pretrained too.
        model.save_pretrained = types.MethodType(save_pretrained, model)


def _distinct_tables(model: nn.Module) -> tuple[list[PushScaledTable], list[list[int]]]:
    """The model's tables in block order, and (block, table index) of each memory layer."""
    tables: list[PushScaledTable] = []
    block_tables = []
    for block, mlp in memory_mlps(model):
        view = mlp.memory.table
        if not any(view is t for t in tables):
            tables.append(view)
        block_tables.append([block, next(i for i, t in enumerate(tables) if t is view)])
    return tables, block_tables


def save_pretrained(model: nn.Module, save_directory, *args, is_main_process=True, **kwargs):
    """``PreTrainedModel.save_pretrained``, plus each value table's checkpoint under
    ``save_directory/memstore/`` (written by the main process; a store table saves
    from its shards)."""
    tables, block_tables = _distinct_tables(model)
    memory = dict(getattr(model.config, CONFIG_KEY))
    memory["tables"] = [
        {"checkpoint": f"{TABLES_DIR}/table-{i}", "store": getattr(view.base, "name", None)}
        for i, view in enumerate(tables)
    ]
    memory["block_tables"] = block_tables
    setattr(model.config, CONFIG_KEY, memory)
    type(model).save_pretrained(
        model, save_directory, *args, is_main_process=is_main_process, **kwargs
    )
    if is_main_process:
        for entry, view in zip(memory["tables"], tables, strict=True):
            _save_table(view.base, os.path.join(os.fspath(save_directory), entry["checkpoint"]))


def _save_table(table, path: str) -> None:
    if os.path.exists(path):  # a save into the same directory replaces the previous one
        shutil.rmtree(path)
    if not isinstance(table, ShardTable):
        table.save(path)  # the distributed table: every shard writes its block
        return
    state = table.state_dict()
    staging = checkpoint.begin(path)
    entry = checkpoint.write_block(staging, "0-0", state)
    config = {
        "name": os.path.basename(path),
        "rows": table.rows,
        "dim": table.dim,
        "dtype": state["dtype"],
        "optimizer": state["optimizer"],
    }
    checkpoint.commit(path, config, [entry], table.last_step, staging=staging)


def _check_memory_config(memory, path: str) -> dict:
    expected = f"a config.json with a '{CONFIG_KEY}' entry written by memstore.hf"
    if not isinstance(memory, dict) or memory.get("version") != FORMAT_VERSION:
        raise InvalidArgument("path", expected, path)
    groups, tables, block_tables = (memory.get(k) for k in ("groups", "tables", "block_tables"))
    if not (isinstance(groups, list) and isinstance(tables, list) and tables):
        raise InvalidArgument("path", expected, path)
    layers = [b for g in groups for b in g.get("layers", [])]
    if not isinstance(block_tables, list) or sorted(b for b, _ in block_tables) != sorted(layers):
        raise InvalidArgument("path", f"{expected} (block_tables naming every layer)", path)
    for entry in tables:
        name = entry.get("checkpoint") if isinstance(entry, dict) else None
        if not isinstance(name, str) or os.path.isabs(name) or ".." in name.split("/"):
            raise InvalidArgument("path", f"{expected} (table checkpoints inside it)", path)
    return memory


def _restored_tables(path: str, memory: dict) -> list[ShardTable]:
    """Each saved table, restored into a local ShardTable."""
    tables = []
    for entry in memory["tables"]:
        where = os.path.join(path, entry["checkpoint"])
        manifest = checkpoint.read_manifest(where)
        t = manifest["table"]
        table = ShardTable(
            t["rows"], t["dim"], optimizer=optimizer_from_dict(t["optimizer"]), dtype=t["dtype"]
        )
        table.load_state_dict(checkpoint.load_block(where, table.spec, manifest))
        tables.append(table)
    return tables


def _attached_tables(table, count: int) -> list:
    if isinstance(table, (list, tuple)):
        if len(table) != count:
            raise InvalidArgument("table", f"a list of {count} tables (one per saved table)", table)
        return list(table)
    if count != 1:
        raise InvalidArgument("table", f"a list of {count} tables (one per saved table)", table)
    return [table]


def from_pretrained(path, table=None, **config_kwargs) -> nn.Module:
    """The causal LM saved at ``path`` with its memory layers, in eval mode.

    ``table=None``: each saved table is restored into a local ShardTable. Otherwise
    ``table`` (or a list, one per saved table) is attached as is: e.g. a store table
    loaded from ``path/memstore/table-0`` with ``memstore.load_table``, or connected.
    ``config_kwargs`` go to ``AutoConfig.from_pretrained`` (e.g. ``dtype``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    memory = _check_memory_config(getattr(config, CONFIG_KEY, None), path)
    delattr(config, CONFIG_KEY)  # add_memory_layers records the groups again
    model = AutoModelForCausalLM.from_config(config)
    if table is None:
        tables = _restored_tables(path, memory)
    else:
        tables = _attached_tables(table, len(memory["tables"]))
    table_of_block = dict(memory["block_tables"])
    for group in memory["groups"]:
        layers = group["layers"]
        add_memory_layers(
            model,
            layers,
            MemoryLayerArgs.from_dict(group["args"]),
            group["mode"],
            table=[tables[table_of_block[b]] for b in layers],
        )
    _load_weights(model, path)
    return model.eval()


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        if any(os.path.basename(n) != n for n in names):
            raise InvalidArgument("path", "a weight index naming files beside it", path)
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise InvalidArgument("path", "a directory with model.safetensors (save_pretrained)", path)
    return [single]


def _load_weights(model: nn.Module, path: str) -> None:
    """Load the saved weights; a weight missing from the files must be tied to one that
    is there (e.g. lm_head tied to the embeddings, which save_pretrained leaves out)."""
    from safetensors.torch import load_file

    state = {}
    for file in _weight_files(path):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [
        m for m in missing if m not in params or not any(params[m] is params.get(k) for k in state)
    ]
    if unexpected or untied:
        raise InvalidArgument(
            "path",
            "weights matching the model with its memory layers",
            {"missing": untied, "unexpected": unexpected},
        )
