"""Helpers of the gRPC tests: tokens, a server on a free loopback port, raw calls."""

from __future__ import annotations

import grpc
import numpy as np

from memstore.v1 import memstore_pb2 as pb

ADMIN = "admin-token-" + "a" * 20
WRITER = "write-token-" + "w" * 20
READER = "read-token-" + "r" * 20
TOKENS = {
    ADMIN: frozenset({"read", "write", "admin"}),
    WRITER: frozenset({"read", "write"}),
    READER: frozenset({"read"}),
}


def stub(address: str):
    from memstore.v1 import memstore_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.MemoryStoreStub(channel)


def auth(token: str = ADMIN):
    return (("authorization", f"Bearer {token}"),)


def tensor(a: np.ndarray, dtype=None, shape=None, data=None) -> pb.Tensor:
    """A Tensor message of ``a``; dtype, shape or data overridden to make it malformed."""
    kinds = {
        np.dtype("float32"): pb.FLOAT32,
        np.dtype("int64"): pb.INT64,
        np.dtype("int32"): pb.INT32,
        np.dtype("float64"): pb.FLOAT64,
    }
    a = np.ascontiguousarray(a)
    return pb.Tensor(
        dtype=kinds[a.dtype] if dtype is None else dtype,
        shape=list(a.shape) if shape is None else shape,
        data=a.tobytes() if data is None else data,
    )


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""
