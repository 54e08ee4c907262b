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
- Engram layers with ``engram_prefetch`` (:meth:`Replica.train_step`): the rows of a
  batch are hashed and their lookup issued before the forward, the row gradients are
  pushed without waiting, and the step returns once its pushes are acknowledged. The
  lookup of step s+1 always reads the values of step s, as the blocking forward would:
  it is issued right after the backward of s (a one-batch lookahead) when the table
  applies s with the push of s that precedes it on the handle's I/O thread (a store
  table with ``step_on_push`` and one push per step: one rank); otherwise when the
  batch of s+1 is made, after the table's step of s (with W ranks and ``step_on_push``,
  after a barrier that follows every rank's acknowledged pushes of s).
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.nn.functional as F

import memstore

from . import finetune
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


def _steps_on_push(table, one_push: bool) -> bool:
    """Whether ``table`` is a store table that applies a step within the call of its
    last push of the step (``step_on_push``); ``one_push``: and that push is the only
    one (one rank), so a lookup queued behind it on the handle's I/O thread reads the
    step it applies."""
    return (
        isinstance(table, memstore.Table)
        and bool(table.config.get("step_on_push"))
        and (not one_push or table.config.get("pushes_per_step") == 1)
    )


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
        self.prefetch = bool(self.model_args.engram_layers) and self.model_args.engram_prefetch
        engram_tables = [layer.table for layer in self.model.engram_layers()]
        self.lookahead = (
            self.prefetch and world == 1 and all(_steps_on_push(t, True) for t in engram_tables)
        )
        self._barrier = world > 1 and any(_steps_on_push(t, False) for t in engram_tables)
        self._ahead: tuple[int, dict] | None = None  # (step, fetches) issued a step early

    def _build_optimizer(self) -> None:
        """AdamW over the dense parameters; a ``pkm_value_group`` peer's values get a
        group of their own, trained as the store trains its values (the values' lr and
        the store's Adam betas and eps, no weight decay, no clipping). A fine-tuning run
        first starts from ``finetune.from`` and freezes what its method does not train
        (:mod:`trainer.finetune`); with no dense parameter left, nothing steps them."""
        if self.args.finetune.method is not None:
            finetune.start_from(self.model, self.args.finetune)
            self.params = finetune.prepare(self.model, self.args.finetune)
            if not self.params:
                self.clipped, self.opt = [], finetune.FrozenOptimizer()
                return
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
        rows = self._rows(batch.inputs.shape[0])
        fetch = self._engram_fetch(step, batch.inputs[rows])
        self.model.set_step(step, value_lr=value_lr_at(self.args, step))
        self.opt.zero_grad(set_to_none=True)
        if fetch is None:
            logits = self.net(batch.inputs[rows])
        else:
            logits = self.net(batch.inputs[rows], engram=fetch)
        nll = F.cross_entropy(logits.flatten(0, 1), batch.targets[rows].flatten(), reduction="none")
        if batch.mask is not None:
            nll = nll * batch.mask[rows].flatten().to(nll.dtype)
        loss = nll.sum() / max(count, 1)
        loss.backward()
        if self.lookahead and step < self.args.steps:
            inputs = self.data.global_batch(step + 1).inputs
            inputs = inputs[self._rows(inputs.shape[0])].to(self.device)
            self._ahead = (step + 1, self.model.prefetch_engram(inputs))
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
        self._settle_engram_pushes()
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(norm),
            "lr": lr,
            "tokens": int(batch.inputs[rows].numel()),
            "seconds": time.perf_counter() - start,
        }

    def _rows(self, size: int) -> slice:
        """This rank's rows of a global batch of ``size`` rows."""
        per = size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def _engram_fetch(self, step: int, inputs: torch.Tensor) -> dict | None:
        """The Engram fetches of step ``step``: issued a step early (``lookahead``), or
        now; None without prefetch. A fetch issued for another step is dropped."""
        if not self.prefetch:
            return None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            return ahead[1]
        return self.model.prefetch_engram(inputs)

    def _settle_engram_pushes(self) -> None:
        """Wait for this step's Engram pushes, raising the first failure in the step
        that made it; with W ranks and ``step_on_push`` tables, then wait for every
        rank (a barrier), after which every block has applied the step and the next
        step's lookups read it."""
        pushed = self.model.take_engram_pushes()
        for futures in pushed.values():
            for future in futures:
                future.result()
        if self._barrier and any(pushed.values()):
            import torch.distributed as dist

            dist.barrier()

    def step_tables(self, tables: dict, step: int) -> None:
        """Apply ``step`` on each of ``tables`` (name -> table): every row the step read,
        or the rows the fine-tuning method trains (``trainer.finetune.table_step``)."""
        for table in tables.values():
            finetune.table_step(table, step, self.args.finetune)

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
