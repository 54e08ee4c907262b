"""Memory layers in your own Ray Train job.

The driver creates a value table in the store. Every Ray Train worker connects to it
by name, builds two MemoryLayers on it (they share the rows; each has its own keys and
query net), wraps the model in DDP and trains on its slice of each batch. The push ids
of the layers' backward passes come from ``MemoryPushes``, and the table applies each
step with its last push. The task: recall a value for each of 512 keys.

The shards and the workers share the cluster's CPUs: each gets an equal share, at most
one CPU (fractional CPUs, so 2 workers and 2 shards fit a 2-core machine). A request
the cluster cannot hold (``--workers 8 --cpus-per-worker 1`` on 2 cores) is refused
before Ray Train starts, naming what was asked, what the cluster has and the setting to
change, instead of waiting for resources that will not come.

    python examples/ray_train_memory.py [--workers 2] [--steps 100] [--cpus-per-worker C]
"""

import argparse

import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

import memstore
from memstore import MemoryLayer, MemoryLayerArgs
from memstore.trainer.memory import MemoryPushes, pushes_per_step, sum_dense_gradients

KEYS, ANSWERS, DIM = 512, 16, 32
LAYER = MemoryLayerArgs(dim=DIM, heads=2, k=8, n_keys=16, key_dim=16)  # 256 value rows


class Recall(torch.nn.Module):
    """key -> embedding -> two memory layers (residual) -> logits over the answers."""

    def __init__(self, table):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(KEYS, DIM)
        self.memory = torch.nn.ModuleList(MemoryLayer(LAYER, table=table) for _ in range(2))
        self.out = torch.nn.Linear(DIM, ANSWERS)

    def forward(self, keys):
        x = self.embed(keys)
        for layer in self.memory:
            x = x + layer(x)
        return self.out(x)


def train_loop_per_worker(config):
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = Recall(memstore.connect(config["table"]))
    pushes = MemoryPushes(model.memory)  # push ids from this worker's rank
    model = sum_dense_gradients(prepare_model(model))  # DDP sums, as the store does
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    answers = torch.randint(0, ANSWERS, (KEYS,), generator=torch.Generator().manual_seed(0))
    for step in range(1, config["steps"] + 1):
        batch = torch.randint(0, KEYS, (64,), generator=torch.Generator().manual_seed(step))
        mine = batch.chunk(world)[rank]
        pushes.set_step(step)
        # This rank's share of the mean loss over the whole batch.
        loss = F.cross_entropy(model(mine), answers[mine], reduction="sum") / len(batch)
        optimizer.zero_grad()
        loss.backward()  # pushes to the table; the last push of the step applies it
        optimizer.step()
    with torch.no_grad():  # every key, looked up in the trained table
        accuracy = (model(torch.arange(KEYS)).argmax(-1) == answers).float().mean().item()
    ray.train.report({"accuracy": accuracy})
    return accuracy


SHARDS = 2


def cpu_shares(cpus: float, workers: int, cpus_per_worker: float | None) -> tuple[float, float]:
    """(CPUs per shard, CPUs per worker) for ``workers`` workers and SHARDS shards on a
    cluster with ``cpus`` free CPUs; refused when they do not fit."""
    share = min(1.0, cpus / (workers + SHARDS))
    per_worker = share if cpus_per_worker is None else cpus_per_worker
    asked = workers * per_worker + SHARDS * share
    if workers < 1 or per_worker <= 0 or asked > cpus + 1e-9:
        raise SystemExit(
            f"asked for {workers} workers x {per_worker:g} CPU + {SHARDS} shards x "
            f"{share:g} CPU = {asked:g} CPUs; the cluster has {cpus:g} free CPUs. "
            "Lower --workers or --cpus-per-worker (or start Ray with more CPUs)."
        )
    return share, per_worker


def main(
    workers: int = 2,
    steps: int = 100,
    storage_path: str | None = None,
    cpus_per_worker: float | None = None,
) -> float:
    cpus_per_shard, cpus_per_worker = cpu_shares(
        ray.available_resources().get("CPU", 0.0), workers, cpus_per_worker
    )
    table = memstore.create_table(
        "example-recall",
        LAYER.n_keys**2,
        LAYER.value_dim,
        shards=SHARDS,
        cpus_per_shard=cpus_per_shard,
        optimizer=memstore.Adam(lr=3e-2),
        step_on_push=True,
        pushes_per_step=pushes_per_step(workers, layers=2),
    )
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"table": table.name, "steps": steps},
            scaling_config=ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=RunConfig(name="example-recall", storage_path=storage_path),
        )
        return trainer.fit().return_value
    finally:
        table.drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--cpus-per-worker", type=float, help="default: an equal share of the cluster's CPUs"
    )
    ns = parser.parse_args()
    ray.init()
    accuracy = main(ns.workers, ns.steps, cpus_per_worker=ns.cpus_per_worker)
    print(f"recall accuracy over {KEYS} keys: {accuracy:.3f}")
