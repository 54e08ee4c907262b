"""One data-parallel rank: the model, its dense optimizer and its slice of each batch.

How a step works with W ranks (W = 1 in-process):

- Every rank draws the same global batch of step s (:class:`trainer.data.StepData`, a
  generator seeded by ``(seed, s)``) and keeps its slice of B/W rows.
- Its loss is the sum of its masked token losses divided by the *global* count of
  target tokens, so the losses of all ranks sum to the mean over the global batch.
  DDP sums the dense gradients over ranks (``trainer.memory.sum_dense_gradients``),
  which makes them the gradients of that mean; the store sums the W pushes of the
  value gradients the same way.
- The dense gradients are clipped to ``grad_clip`` by their global norm and AdamW steps
  them with warm-up and cosine decay. Value rows are not clipped (their gradients never
  leave the store); their lr follows the same schedule scaled to ``value_lr`` and
  travels with each push, so the shard applies the step with it.
- In sync mode a shard applies step s within the call that brings its last push of s
  (``store.step_on_push``): a rank's backward returns only after its own pushes, and
  DDP's reduction of the last gradients waits for every rank's backward, so no lookup
  of step s+1 can precede the update of step s.
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.nn.functional as F

import memstore

from .config import TrainArgs, ValueSchedule
from .data import Batch, StepData
from .memory import sum_dense_gradients
from .model import Transformer

__all__ = ["Replica", "lr_at", "value_lr_at"]


def lr_at(args: TrainArgs, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr``."""
    if args.warmup and step <= args.warmup:
        return args.lr * step / args.warmup
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def value_lr_at(args: TrainArgs, step: int) -> float:
    """The values' lr: :func:`lr_at`'s shape scaled to ``value_lr`` (its floor is
    ``value_lr · min_lr / lr``), or ``value_lr`` with ``value_schedule: constant``."""
    if args.value_schedule is ValueSchedule.CONSTANT:
        return args.value_lr
    return args.value_lr * lr_at(args, step) / args.lr


class Replica:
    """Rank ``rank`` of ``world``; ``tables``: the model's value tables (None: local
    ShardTables, in-process); ``device``: default the config's. With ``world > 1`` the
    model is wrapped in DDP (the process group exists: Ray Train made it)."""

    def __init__(
        self,
        args: TrainArgs,
        rank: int = 0,
        world: int = 1,
        tables: dict | None = None,
        device: torch.device | None = None,
    ):
        self.args, self.rank, self.world = args, rank, world
        if args.threads_per_worker:
            torch.set_num_threads(args.threads_per_worker)
        self.device = args.torch_device() if device is None else device
        self.data = StepData(args)
        self.model_args = args.model_args(self.data.vocab_size)
        self.model = Transformer(self.model_args, tables=tables, rank=rank)
        self.model.to(self.device).train()
        self.net = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # The rotary tables are buffers equal on every rank: no sync per forward.
            sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            self.net = sum_dense_gradients(
                DistributedDataParallel(
                    self.model,
                    device_ids=[self.device] if self.device.type == "cuda" else None,
                    **sync,
                )
            )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        """AdamW over the dense parameters; a ``pkm_value_group`` peer's values get a
        group of their own, trained as the store trains its values (the values' lr and
        the store's Adam betas and eps, no weight decay, no clipping)."""
        values = self.model.peer_values() if self.model_args.pkm_value_group else []
        self.clipped = [p for p in self.params if all(p is not v for v in values)]
        groups = [{"params": self.clipped}]
        if values:
            adam = memstore.Adam()
            groups.append(
                {
                    "params": values,
                    "values": True,
                    "weight_decay": 0.0,
                    "betas": adam.betas,
                    "eps": adam.eps,
                }
            )
        self.opt = torch.optim.AdamW(
            groups, lr=self.args.lr, betas=(0.9, 0.95), weight_decay=self.args.weight_decay
        )

    def train_step(self, step: int) -> dict:
        """Forward and backward of this rank's slice, clip, dense update. Returns this
        rank's share of the loss (the shares sum to the global mean), the global
        gradient norm before clipping, and this rank's tokens."""
        start = time.perf_counter()
        batch = Batch(
            *(t if t is None else t.to(self.device) for t in self.data.global_batch(step))
        )
        count = batch.targets.numel() if batch.mask is None else int(batch.mask.sum())
        per = batch.inputs.shape[0] // self.world
        rows = slice(self.rank * per, (self.rank + 1) * per)
        self.model.set_step(step, value_lr=value_lr_at(self.args, step))
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(batch.inputs[rows])
        nll = F.cross_entropy(logits.flatten(0, 1), batch.targets[rows].flatten(), reduction="none")
        if batch.mask is not None:
            nll = nll * batch.mask[rows].flatten().to(nll.dtype)
        loss = nll.sum() / max(count, 1)
        loss.backward()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.args.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.clipped, self.args.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.clipped]))
        lr = lr_at(self.args, step)
        for group in self.opt.param_groups:
            group["lr"] = value_lr_at(self.args, step) if group.get("values") else lr
        self.opt.step()
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(norm),
            "lr": lr,
            "tokens": int(batch.inputs[rows].numel()),
            "seconds": time.perf_counter() - start,
        }

    def evaluate(self) -> dict:
        return self.data.evaluate(self.model)

    def state(self) -> dict:
        """Dense parameters and optimizer state (the values live in the tables)."""
        opt = self.opt.state_dict()
        opt["state"] = {
            i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
            for i, st in opt["state"].items()
        }
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": opt,
            "rng": torch.get_rng_state(),
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
