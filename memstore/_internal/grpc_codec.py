"""memstore.v1.Tensor <-> numpy, shared by the gRPC server and client (numpy only).

Decoding checks everything a hostile peer controls before a byte is interpreted:
the dtype is a known one, the shape has the expected number of dimensions, each in
[0, MAX_DIM), the byte length equals product(shape) × item size, and the tensor is
not empty. Every failure raises :class:`InvalidArgument` naming the field.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from ..v1 import memstore_pb2 as pb

MAX_DIM = 1 << 31

# enum value -> little-endian numpy dtype as stored on the wire (bfloat16 as uint16)
_WIRE = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.BFLOAT16: np.dtype("<u2"),
    pb.FLOAT16: np.dtype("<f2"),
}
FLOATS = frozenset({pb.FLOAT32, pb.FLOAT64, pb.BFLOAT16, pb.FLOAT16})
INTS = frozenset({pb.INT32, pb.INT64})
_OF_NUMPY = {
    np.dtype("float32"): pb.FLOAT32,
    np.dtype("float64"): pb.FLOAT64,
    np.dtype("int32"): pb.INT32,
    np.dtype("int64"): pb.INT64,
    np.dtype("float16"): pb.FLOAT16,
}


def _names(kinds) -> str:
    return ", ".join(sorted(pb.DType.Name(k) for k in kinds))


def decode(field: str, message, has: bool, kinds: frozenset, ndim: int) -> np.ndarray:
    """The array in Tensor ``message`` (``has``: the request set the field), float32 for
    floating kinds; read-only, sharing the message's bytes where possible."""
    if not has:
        raise InvalidArgument(field, f"a {ndim}-d Tensor", "no tensor")
    if message.dtype not in _WIRE or message.dtype not in kinds:
        raise InvalidArgument(f"{field}.dtype", f"one of {_names(kinds)}", message.dtype)
    shape = tuple(message.shape)
    if len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape", f"{ndim} dimensions", list(shape))
    if any(d < 0 or d >= MAX_DIM for d in shape):
        raise InvalidArgument(f"{field}.shape", f"every dimension in [0, {MAX_DIM})", list(shape))
    wire = _WIRE[message.dtype]
    count = 1
    for d in shape:
        count *= d
    if count * wire.itemsize != len(message.data):
        raise InvalidArgument(
            f"{field}.data",
            f"{count * wire.itemsize} bytes for shape "
            f"{list(shape)} of {pb.DType.Name(message.dtype)}",
            f"{len(message.data)} bytes",
        )
    if count == 0:
        raise InvalidArgument(field, "a non-empty tensor", f"shape {list(shape)}")
    a = np.frombuffer(message.data, dtype=wire).reshape(shape)
    if message.dtype == pb.BFLOAT16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    if message.dtype in FLOATS and message.dtype != pb.FLOAT32:
        return a.astype(np.float32)
    return a


def encode(a, out=None):
    """A Tensor message (or fill ``out``) with array ``a`` (float32/64, float16,
    int32/64), little-endian, C order."""
    a = np.asarray(a)
    if a.dtype not in _OF_NUMPY:
        raise InvalidArgument("tensor", f"dtype among {sorted(str(d) for d in _OF_NUMPY)}", a.dtype)
    out = pb.Tensor() if out is None else out
    out.dtype = _OF_NUMPY[a.dtype]
    out.shape[:] = a.shape
    out.data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    return out


def bfloat16_bytes(a: np.ndarray) -> bytes:
    """float32 array -> bfloat16 wire bytes (truncating the low 16 bits)."""
    return (np.ascontiguousarray(a, dtype="<f4").view(np.uint32) >> 16).astype("<u2").tobytes()
