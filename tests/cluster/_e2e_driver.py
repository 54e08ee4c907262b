"""The driver of tests/cluster/test_e2e_multinode.py: a separate process that joins the
local multi-node cluster through RAY_ADDRESS, as a user's training job would, and
trains the facts model (memstore/trainer/model.py, memstore/trainer/data.py) with its
memory table in the store.

It speaks JSON lines: it prints one object per phase on stdout and, between phases,
waits for a command line on stdin, so the test can act on the cluster (query it over
gRPC, stop a node) at a known point of training. Arrays the test compares with what
it reads over gRPC go to .npy files in E2E_WORK_DIR.

Every value is compared with a reference: the same model with a local
``memstore.ShardTable`` (the model's own default), trained in this process on the
same batches. Both start from the same seed, so losses and value rows agree up to
float summation order.

    python -m tests.cluster._e2e_driver
    # env: RAY_ADDRESS, E2E_CHECKPOINT_ROOT (an s3:// URI), E2E_WORK_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import memstore
from memstore.trainer.data import FactsCorpus
from memstore.trainer.model import ModelArgs, Transformer, table_specs, table_users

NAME = "e2e-facts"
SHARDS, BATCH, SEED = 4, 64, 5
LR, VALUE_LR, GRAD_CLIP = 1e-3, 3e-2, 1.0
TIMEOUT_S = 30.0
# facts-small-memory.yaml scaled down: 2 layers, the second FFN a Memory+ layer over a
# shared table of 32² = 1024 rows (4 row blocks of 256 rows).
CORPUS = FactsCorpus(entities=200, attributes=4, values=20, seed=0)
MODEL = ModelArgs(
    vocab_size=CORPUS.vocab_size,
    dim=32,
    n_layers=2,
    n_heads=2,
    max_seq_len=2,
    memory_layers=[1],
    memory_plus=True,
    mem_heads=2,
    mem_k=4,
    mem_n_keys=32,
    mem_key_dim=16,
    shared_memory=True,
    value_lr=VALUE_LR,
    seed=SEED,
)


class Trainer:
    """A model and its dense AdamW; the value tables apply their own optimizer."""

    def __init__(self, tables: dict | None):
        self.model = Transformer(MODEL, tables=tables)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1
        )

    def step(self, step: int) -> float:
        """One step on the facts of ``step``: loss, backward (pushes the value rows'
        gradients, tagged with ``step``), clipped dense update, then the table step."""
        batch = CORPUS.batch(np.random.default_rng([SEED, step]).integers(0, CORPUS.n_facts, BATCH))
        self.model.set_step(step)
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.opt.step()
        for table in self.model.value_tables().values():
            table.step(step)
        return float(loss.detach())

    def state(self) -> dict:
        """Dense weights and optimizer state: what a trainer restores on StoreRolledBack."""
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict()})

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    def values(self) -> torch.Tensor:
        (table,) = self.model.value_tables().values()
        return table.gather(torch.arange(table.rows)).float()


def _train(store: Trainer, reference: Trainer, steps) -> float:
    """Train both on the same steps; the largest difference of their losses."""
    return max(abs(store.step(s) - reference.step(s)) for s in steps)


def _diff(store: Trainer, reference: Trainer) -> float:
    dense = max(
        float((a - b).abs().max())
        for a, b in zip(store.model.parameters(), reference.model.parameters())
    )
    return max(dense, float((store.values() - reference.values()).abs().max()))


def _query_inputs(model: Transformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory layer's normalised product keys and queries (B·T, H, Dk) for the first
    facts, as its own top-k computes them (MemoryLayer.topk), and that top-k's indices."""
    layer = model.memory_layers()[0]
    a, seen = layer.args, []
    hook = layer.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model(CORPUS.batch(np.arange(8)).inputs)
        hook.remove()
        x = seen[0].reshape(-1, a.dim)
        half = a.key_dim // 2
        q = F.rms_norm(layer.query(x).view(-1, a.heads, 2, half), (half,))
        _, indices = layer.topk(x)
        return F.rms_norm(layer.keys, (half,)), q.reshape(-1, a.heads, a.key_dim), indices


def _shard_ips(table) -> list[str]:
    import ray

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return sorted(ips.get(i["node_id"], "dead") for i in table._call_all("info").values())


def _say(**event) -> None:
    print(json.dumps(event), flush=True)


def _wait_for(command: str) -> None:
    line = sys.stdin.readline().strip()
    if line != command:
        raise SystemExit(f"expected {command!r} on stdin, got {line!r}")


def _create_table():
    ((name, (rows, dim)),) = table_specs(MODEL).items()
    return name, memstore.create_table(
        NAME,
        rows=rows,
        dim=dim,
        shards=SHARDS,
        seed=MODEL.seed + table_users(MODEL)[name][0],
        optimizer=memstore.Adam(lr=VALUE_LR),
        checkpoint_root=os.environ["E2E_CHECKPOINT_ROOT"],
        max_restarts=2,
        timeout_s=TIMEOUT_S,
    )


def _publish_and_query(table, model: Transformer, work: Path) -> bool:
    """Publish the model's keys, query the table through this Ray handle, and leave the
    queries and the answer for the test; True when the store's top-k is the model's."""
    keys, q, indices = _query_inputs(model)
    table.publish_keys(keys)
    got_indices, scores, values = table.query(q, k=MODEL.mem_k)
    for name, array in (("q", q), ("indices", got_indices), ("scores", scores), ("values", values)):
        np.save(work / f"{name}.npy", array.numpy())
    return bool(torch.equal(got_indices, indices))


def _train_until_rolled_back(store, first: int, attempts: int = 20) -> int | None:
    """Train steps from ``first`` until one meets the lost shards; their processes die
    a moment after their raylet, so a step just after the node loss may still be
    answered. Returns the step the store rolled back to."""
    for step in range(first, first + attempts):
        try:
            store.step(step)
        except memstore.StoreRolledBack as e:
            return e.step
        time.sleep(0.5)
    return None


def main() -> int:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    work = Path(os.environ["E2E_WORK_DIR"])
    table_name, table = _create_table()
    try:
        store, reference = Trainer({table_name: table}), Trainer(None)
        placed = _shard_ips(table)
        loss_diffs = [_train(store, reference, (1, 2))]
        saved_path = table.save()
        saved = {
            "store": store.state(),
            "reference": reference.state(),
            "table": copy.deepcopy(reference.model.value_tables()[table_name].state_dict()),
            "values": store.values(),
        }
        loss_diffs.append(_train(store, reference, (3,)))  # a step after the checkpoint
        same_topk = _publish_and_query(table, store.model, work)
        np.save(work / "rows-trained.npy", store.values().numpy())
        _say(
            phase="trained",
            driver=ray.util.get_node_ip_address(),
            shards=placed,
            grid=list(table.grid.shape),
            checkpoint=saved_path,
            last_step=table.last_step,
            loss_diff=max(loss_diffs),
            max_diff=_diff(store, reference),
            same_topk=same_topk,
        )

        _wait_for("node-stopped")
        rolled_back = _train_until_rolled_back(store, first=4)
        # The trainer restores its own state of the checkpoint's step and trains on.
        store.restore(saved["store"])
        reference.restore(saved["reference"])
        reference.model.value_tables()[table_name].load_state_dict(saved["table"])
        restored_diff = float((store.values() - saved["values"]).abs().max())
        loss_diff = _train(store, reference, (3, 4))
        np.save(work / "rows-recovered.npy", store.values().numpy())
        _say(
            phase="recovered",
            rolled_back_to=rolled_back,
            last_step=table.last_step,
            restored_diff=restored_diff,
            loss_diff=loss_diff,
            max_diff=_diff(store, reference),
            shards=_shard_ips(table),
        )
        _wait_for("done")  # the test reads the recovered table over gRPC meanwhile
    finally:
        memstore.drop_table(NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
