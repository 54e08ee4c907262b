"""The driver of tests/cluster/test_e2e_multinode.py: a separate process that joins the
local multi-node cluster through RAY_ADDRESS, as a user's training job would.

It speaks JSON lines: it prints one object per phase on stdout and, between phases,
waits for a command line on stdin, so the test can act on the cluster (stop a node) at
a known point of training. Every value the table returns is compared with an
in-process ``memstore.ShardTable`` of the same seed trained on the same batches.

    python -m tests.cluster._e2e_driver     # env: RAY_ADDRESS, E2E_CHECKPOINT_ROOT
"""

from __future__ import annotations

import json
import os
import sys

import torch

import memstore

NAME = "e2e-multinode"
ROWS, DIM, SHARDS = 4096, 64, 4
SEED, LR = 5, 1e-2
TIMEOUT_S = 30.0


def _batch(step: int, batch: int = 16, slots: int = 8):
    g = torch.Generator().manual_seed(2000 + step)
    idx = torch.randint(0, ROWS, (batch, slots), generator=g)
    w = torch.softmax(torch.randn(batch, slots, generator=g), dim=-1)
    return idx, w, torch.randn(batch, DIM, generator=g)


def _reference() -> memstore.ShardTable:
    return memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=LR), seed=SEED)


def _train(table, reference, step: int) -> float:
    """One lookup/backward/step round on both; the largest difference seen."""
    idx, w, dy = _batch(step)
    err = (table.lookup(idx, w) - reference.lookup(idx, w)).abs().max()
    err = max(err, (table.backward(idx, w, dy, step=step)
                    - reference.backward(idx, w, dy, step=step)).abs().max())
    assert table.step(step) == reference.step(step)
    return float(err)


def _max_diff(table, reference) -> float:
    rows = torch.arange(ROWS)
    return float((table.gather(rows) - reference.gather(rows).float()).abs().max())


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


def main() -> int:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    table = memstore.create_table(
        NAME, rows=ROWS, dim=DIM, shards=SHARDS, seed=SEED, optimizer=memstore.Adam(lr=LR),
        checkpoint_root=os.environ["E2E_CHECKPOINT_ROOT"], max_restarts=2,
        timeout_s=TIMEOUT_S)
    try:
        reference = _reference()
        placed = _shard_ips(table)
        errors = [_train(table, reference, step) for step in (1, 2)]
        saved_path = table.save()
        saved = _reference()
        saved.load_state_dict(reference.state_dict())
        errors.append(_train(table, reference, 3))  # a step after the checkpoint
        _say(phase="trained", driver=ray.util.get_node_ip_address(), shards=placed,
             grid=list(table.grid.shape), checkpoint=saved_path, max_err=max(errors))

        _wait_for("node-stopped")
        idx, w, _ = _batch(4)
        try:
            table.lookup(idx, w)
            rolled_back = None
        except memstore.StoreRolledBack as e:
            rolled_back = e.step
        restored_diff = _max_diff(table, saved)
        after = [_train(table, saved, step) for step in (3, 4)]  # the trainer goes on
        _say(phase="recovered", rolled_back_to=rolled_back, last_step=table.last_step,
             restored_diff=restored_diff, max_err=max(after),
             final_diff=_max_diff(table, saved), shards=_shard_ips(table))
    finally:
        memstore.drop_table(NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
