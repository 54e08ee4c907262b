"""Input checks shared by every public operation.

Each check raises :class:`InvalidArgument` naming the field and the expected value,
and runs before anything is modified, so a rejected call changes nothing.

The value checks of CPU tensors (index ranges, finiteness) run in numpy, on the calling
thread: torch would split them over its intra-op threads, whose wake-ups and spinning
take cores from shards on the same machine for checks that take a fraction of a
millisecond on one thread.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping

import numpy as np
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
        values = t.detach().numpy() if t.device.type == "cpu" else t
        tmin, tmax = int(values.min()), int(values.max())
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
    finite = (
        np.isfinite(t.detach().numpy()).all() if t.device.type == "cpu" else torch.isfinite(t).all()
    )
    if not bool(finite):
        raise InvalidArgument(
            field,
            "finite float32 values (no NaN, Inf or magnitudes beyond float32's range)",
            "NaN, Inf or an overflow",
        )
    return t


def check_step_window(field: str, step: int, last_applied: int) -> int:
    """A step after ``last_applied`` and at most MAX_STEPS_AHEAD beyond it."""
    if not last_applied < step <= last_applied + MAX_STEPS_AHEAD:
        raise InvalidArgument(
            field,
            f"a step in [{last_applied + 1}, "
            f"{last_applied + MAX_STEPS_AHEAD}] (at most {MAX_STEPS_AHEAD} "
            f"after the last applied step {last_applied})",
            step,
        )
    return step


# Bounds that keep a table's values finite (float32 and bfloat16 reach 3.4e38). A row's
# gradient in one push is a sum of at most ``slots`` products w * dy, so with
# max|w| * max|dy| * slots <= MAX_ROW_GRAD it stays below 1e30; an update is lr times
# the gradient (SGD) or lr times a bounded ratio (Adagrad, Adam), and with lr <= MAX_LR
# it stays below 1e34, far from overflow. Beyond either bound the inputs are refused:
# they could only turn rows into inf or NaN.
MAX_LR = 1e4
MAX_ROW_GRAD = 1e30


def check_lr(field: str, lr) -> float | None:
    """None (the optimizer's own lr) or a finite number in (0, MAX_LR]."""
    if lr is None:
        return None
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not math.isfinite(lr)
        or not 0 < lr <= MAX_LR
    ):
        raise InvalidArgument(field, f"None or a finite number in (0, {MAX_LR:g}]", lr)
    return float(lr)


def _max_abs(t) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.detach().abs().max())
    return float(np.abs(t).max())


def check_push_magnitude(w, dy) -> None:
    """Refuse a push whose row gradients could overflow: max|w| * max|dy| * slots above
    MAX_ROW_GRAD (w: the push's weights, any shape; dy: its output gradients)."""
    sizes = [t.numel() if isinstance(t, torch.Tensor) else np.size(t) for t in (w, dy)]
    if 0 in sizes:
        return
    bound = _max_abs(w) * _max_abs(dy) * sizes[0]
    if bound > MAX_ROW_GRAD:
        raise InvalidArgument(
            "dy",
            f"max|w| * max|dy| * slots at most {MAX_ROW_GRAD:g} (so row gradients stay finite)",
            f"{bound:.3g}",
        )


def check_step(field: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument(field, "an int >= 0", step)
    return step


def check_known_keys(cls, d: Mapping, field: str) -> None:
    """Refuse keys of ``d`` that are not fields of the dataclass ``cls``, naming each
    with its path under ``field`` (a typo in a config must not silently fall back to a
    default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        prefix = f"{field}." if field else ""
        raise InvalidArgument(
            field or "config",
            f"keys among {sorted(known)}",
            "unknown keys " + ", ".join(prefix + str(k) for k in unknown),
        )


def dataclass_from_dict(cls, d, field: str):
    """``cls(**d)`` for a mapping ``d`` (None: no keys), refusing keys that are not
    fields of ``cls``. With :func:`check_fields` in ``cls.__post_init__`` every value is
    also checked against its field's type and bounds."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise InvalidArgument(field or "config", "a mapping", type(d).__name__)
    check_known_keys(cls, d, field)
    return cls(**d)


def bounded(default=dataclasses.MISSING, *, min=None, gt=None, **kwargs):  # noqa: A002
    """A dataclass field whose value :func:`check_fields` bounds: ``>= min``, ``> gt``."""
    metadata = {k: v for k, v in (("min", min), ("gt", gt)) if v is not None}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def check_fields(obj) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation and
    bounds (:func:`bounded`), in place, so a config is strict however it was built.

    Annotations understood: ``bool``, ``int`` (never a bool), ``float`` (an int or a
    finite float, stored as float), ``str``, an ``Enum`` (its member or value, stored
    as the member), ``list[X]``, ``dict``, a dataclass (a mapping is built into it with
    :func:`dataclass_from_dict`; its errors are named under this field), ``X | None``
    and unions. Anything else is taken as it is. Errors name the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _checked(f.name, getattr(obj, f.name), hints[f.name])
        _check_bounds(f.name, value, f.metadata)
        setattr(obj, f.name, value)


def _checked(field: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _checked(field, value, option)
            except InvalidArgument as e:
                errors.append(e.expected)
        raise InvalidArgument(
            field, " or ".join(errors + (["None"] if type(None) in options else [])), value
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise InvalidArgument(field, f"a list of {_name(typing.get_args(hint)[0])}", value)
        return [_checked(field, v, typing.get_args(hint)[0]) for v in value]
    return _checked_plain(field, value, origin or hint)


def _checked_plain(field: str, value, kind):
    if kind is bool or kind is str or kind is dict:
        if not isinstance(value, kind):
            raise InvalidArgument(field, _name(kind), value)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(field, "an int", value)
    elif kind is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise InvalidArgument(field, "a finite number", value)
        return float(value)
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise InvalidArgument(field, _name(kind), value) from None
    elif dataclasses.is_dataclass(kind) and not isinstance(value, kind):
        try:
            return dataclass_from_dict(kind, value, field)
        except InvalidArgument as e:
            inner = (
                e.field
                if e.field.startswith(f"{field}.") or e.field == field
                else f"{field}.{e.field}"
            )
            raise InvalidArgument(inner, e.expected, e.got) from None
    return value


def _check_bounds(field: str, value, bounds: Mapping) -> None:
    if value is None or not bounds:
        return
    if isinstance(value, list):
        for item in value:
            _check_bounds(field, item, bounds)
        return
    kind = "an int" if isinstance(value, int) else "a finite number"
    if "min" in bounds and value < bounds["min"]:
        raise InvalidArgument(field, f"{kind} >= {bounds['min']}", value)
    if "gt" in bounds and value <= bounds["gt"]:
        raise InvalidArgument(field, f"{kind} > {bounds['gt']}", value)


def _name(kind) -> str:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in kind)
    return {
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
        int: "an int",
        float: "a finite number",
    }.get(kind, getattr(kind, "__name__", str(kind)))
