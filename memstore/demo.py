"""``memstore demo``: an in-process MemoryLayer with a 1M-row table learning a recall task.

Each of ``facts`` random input vectors must recall its own random target vector; the
only place that can store them is the memory. Prints a progress bar with the loss and
a closing throughput line.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm import tqdm

from .memory_layer import MemoryLayer, MemoryLayerArgs


@dataclasses.dataclass
class DemoArgs:
    steps: int = 200
    batch: int = 1024  # tokens per step
    n_keys: int = 1024  # the table has n_keys² rows
    dim: int = 256
    heads: int = 4
    k: int = 32
    facts: int = 16384
    seed: int = 0


@dataclasses.dataclass
class DemoResult:
    rows: int
    first_loss: float
    last_loss: float
    tokens_per_s: float
    rows_read_per_s: float
    seconds: float


def run_demo(args: DemoArgs, progress: bool = True) -> DemoResult:
    torch.manual_seed(args.seed)
    layer = MemoryLayer(
        MemoryLayerArgs(
            dim=args.dim,
            heads=args.heads,
            k=args.k,
            n_keys=args.n_keys,
            key_dim=args.dim,
            value_lr=1e-2,
            seed=args.seed,
        )
    )
    inputs = torch.randn(args.facts, args.dim)
    targets = torch.randn(args.facts, args.dim)
    dense = torch.optim.Adam(layer.parameters(), lr=1e-3)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="demo", disable=not progress, unit="step")
    for step in bar:
        batch = torch.randint(0, args.facts, (args.batch,))
        layer.step = step
        loss = torch.nn.functional.mse_loss(layer(inputs[batch]), targets[batch])
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        layer.table.step(step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch
    return DemoResult(
        rows=args.n_keys**2,
        first_loss=losses[0],
        last_loss=sum(losses[-10:]) / len(losses[-10:]),
        tokens_per_s=tokens / seconds,
        rows_read_per_s=tokens * args.heads * args.k / seconds,
        seconds=seconds,
    )
