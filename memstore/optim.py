"""Sparse optimizers of the value tables.

``OptimizerKind`` names each kind and knows its state; the public option groups
(``SGD``, ``Adagrad``, ``RowWiseAdagrad``, ``Adam``, ``AdamW``) are frozen dataclasses
that validate themselves and apply the fused kernel to the unique rows of a step.
All are lazy: rows that no token touched keep their values and their state.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import ClassVar

import torch

from memstore import kernels

from ._internal.validation import check_lr, dataclass_from_dict
from .errors import InvalidArgument

__all__ = [
    "OptimizerKind",
    "SGD",
    "Adagrad",
    "RowWiseAdagrad",
    "Adam",
    "AdamW",
    "optimizer_from_dict",
]


class OptimizerKind(enum.Enum):
    """The optimizers a table can run (the ``kind`` of its optimizer options)."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"
    ADAMW = "adamw"

    def state_names(self) -> tuple[str, ...]:
        return {
            OptimizerKind.SGD: (),
            OptimizerKind.ADAGRAD: ("sum",),
            OptimizerKind.ROWWISE_ADAGRAD: ("sum",),
            OptimizerKind.ADAM: ("exp_avg", "exp_avg_sq"),
            OptimizerKind.ADAMW: ("exp_avg", "exp_avg_sq"),
        }[self]

    def state_shape(self, rows: int, dim: int) -> tuple[int, ...]:
        """Shape of each state tensor of a (rows, dim) block."""
        return (rows,) if self is OptimizerKind.ROWWISE_ADAGRAD else (rows, dim)

    def state_bytes(self, rows: int, dim: int) -> int:
        """float32 bytes of optimizer state for a (rows, dim) block."""
        return 4 * len(self.state_names()) * math.prod(self.state_shape(rows, dim))


def _state_tensor(shape: tuple[int, ...], device) -> torch.Tensor:
    """Uninitialised float32 state; on CPU backed by huge pages, as the values are."""
    if torch.device(device).type == "cpu":
        return kernels.empty_table(shape, torch.float32)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InvalidArgument(name, "a finite number > 0", value)


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise InvalidArgument(name, "a finite number >= 0", value)


def _betas(value) -> None:
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in value)
    ):
        raise InvalidArgument("betas", "two numbers in [0, 1)", value)


@dataclasses.dataclass(frozen=True)
class _Optimizer:
    kind: ClassVar[OptimizerKind]
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_lr("lr", self.lr)

    def initial_state_value(self) -> float:
        return 0.0

    def init_state(self, rows: int, dim: int, device) -> dict[str, torch.Tensor]:
        shape = self.kind.state_shape(rows, dim)
        return {
            name: _state_tensor(shape, device).fill_(self.initial_state_value())
            for name in self.kind.state_names()
        }

    def apply(self, values, state, rows, grads, *, step: int) -> None:
        """Update ``values`` and ``state`` in place; ``step`` is the 1-based update count."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SGD(_Optimizer):
    kind: ClassVar[OptimizerKind] = OptimizerKind.SGD
    lr: float = 0.01
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("weight_decay", self.weight_decay)

    def apply(self, values, state, rows, grads, *, step):
        kernels.sgd_step(values, rows, grads, lr=self.lr, weight_decay=self.weight_decay)


@dataclasses.dataclass(frozen=True)
class Adagrad(_Optimizer):
    kind: ClassVar[OptimizerKind] = OptimizerKind.ADAGRAD
    lr: float = 0.01
    eps: float = 1e-10
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("eps", self.eps)
        _non_negative("lr_decay", self.lr_decay)
        _non_negative("initial_accumulator_value", self.initial_accumulator_value)

    def initial_state_value(self) -> float:
        return float(self.initial_accumulator_value)

    def apply(self, values, state, rows, grads, *, step):
        kernels.adagrad_step(
            values,
            state["sum"],
            rows,
            grads,
            lr=self.lr,
            eps=self.eps,
            lr_decay=self.lr_decay,
            step=step,
        )


@dataclasses.dataclass(frozen=True)
class RowWiseAdagrad(_Optimizer):
    """One accumulator per row: 4 bytes of state per row instead of 4·dim."""

    kind: ClassVar[OptimizerKind] = OptimizerKind.ROWWISE_ADAGRAD
    lr: float = 0.01
    eps: float = 1e-10

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("eps", self.eps)

    def apply(self, values, state, rows, grads, *, step):
        kernels.rowwise_adagrad_step(values, state["sum"], rows, grads, lr=self.lr, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class Adam(_Optimizer):
    """Lazy Adam: equals torch.optim.SparseAdam on the touched rows."""

    kind: ClassVar[OptimizerKind] = OptimizerKind.ADAM
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _betas(self.betas)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _positive("eps", self.eps)

    def _decay(self) -> float:
        return 0.0

    def apply(self, values, state, rows, grads, *, step):
        kernels.adam_step(
            values,
            state["exp_avg"],
            state["exp_avg_sq"],
            rows,
            grads,
            step=step,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            eps=self.eps,
            weight_decay=self._decay(),
            decoupled=self.kind is OptimizerKind.ADAMW,
        )


@dataclasses.dataclass(frozen=True)
class AdamW(Adam):
    """Lazy AdamW: torch.optim.AdamW restricted to the touched rows."""

    kind: ClassVar[OptimizerKind] = OptimizerKind.ADAMW
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("weight_decay", self.weight_decay)

    def _decay(self) -> float:
        return self.weight_decay


_BY_KIND = {cls.kind: cls for cls in (SGD, Adagrad, RowWiseAdagrad, Adam, AdamW)}


def optimizer_from_dict(d: dict) -> _Optimizer:
    """Inverse of ``to_dict``; rejects unknown kinds and unknown option names."""
    d = dict(d)
    try:
        kind = OptimizerKind(d.pop("kind"))
    except (KeyError, ValueError) as e:
        raise InvalidArgument(
            "optimizer.kind", f"one of {[k.value for k in OptimizerKind]}", d.get("kind")
        ) from e
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return dataclass_from_dict(_BY_KIND[kind], d, "optimizer")
