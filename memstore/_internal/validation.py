"""Input checks shared by every public operation.

Each check raises :class:`InvalidArgument` naming the field and the expected value,
and runs before anything is modified, so a rejected call changes nothing.
"""

from __future__ import annotations

import math

import dataclasses

import torch

from ..errors import InvalidArgument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A push or step may name at most this many steps after the last applied one: a bound on
# what a shard keeps pending, and on how far a wrong step number can reach.
MAX_STEPS_AHEAD = 2


def check_dtype_name(field: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(field, f"one of {sorted(DTYPES)}", name)
    return DTYPES[name]


def check_positive_int(field: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(field, f"an int >= {minimum}", value)
    return value


def check_tensor(field: str, t, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(field, f"a {ndim}-d torch.Tensor", type(t).__name__)
    if t.dim() != ndim:
        raise InvalidArgument(field, f"a {ndim}-d tensor", f"shape {tuple(t.shape)}")
    return t


def check_index(field: str, t, ndim: int, lo: int, hi: int) -> torch.Tensor:
    """An int32/int64 tensor of ``ndim`` dims with every entry in [lo, hi)."""
    check_tensor(field, t, ndim)
    if t.dtype not in (torch.int64, torch.int32):
        raise InvalidArgument(field, "an int64 or int32 tensor", t.dtype)
    if t.numel():
        tmin, tmax = int(t.min()), int(t.max())
        if tmin < lo or tmax >= hi:
            raise InvalidArgument(field, f"indices in [{lo}, {hi})", f"range [{tmin}, {tmax}]")
    return t


def wire_float(field: str, t, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` as float32 (the wire and kernel dtype), checked after the cast: finite
    float64 values beyond float32's range become Inf there and are refused."""
    check_tensor(field, t, len(shape))
    if not t.is_floating_point():
        raise InvalidArgument(field, "a floating-point tensor", t.dtype)
    if tuple(t.shape) != tuple(shape):
        raise InvalidArgument(field, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InvalidArgument(field, "finite float32 values (no NaN, Inf or magnitudes "
                              "beyond float32's range)", "NaN, Inf or an overflow")
    return t


def check_step_window(field: str, step: int, last_applied: int) -> int:
    """A step after ``last_applied`` and at most MAX_STEPS_AHEAD beyond it."""
    if not last_applied < step <= last_applied + MAX_STEPS_AHEAD:
        raise InvalidArgument(field, f"a step in [{last_applied + 1}, "
                              f"{last_applied + MAX_STEPS_AHEAD}] (at most {MAX_STEPS_AHEAD} "
                              f"after the last applied step {last_applied})", step)
    return step


def check_lr(field: str, lr) -> float | None:
    """None (the optimizer's own lr) or a finite number > 0."""
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr <= 0:
        raise InvalidArgument(field, "None or a finite number > 0", lr)
    return float(lr)


def check_step(field: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument(field, "an int >= 0", step)
    return step


def dataclass_from_dict(cls, d: dict, field: str):
    """``cls(**d)``, refusing keys that are not fields of ``cls`` (a typo in a config
    must not silently fall back to a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InvalidArgument(field, f"keys among {sorted(known)}", unknown)
    return cls(**d)
