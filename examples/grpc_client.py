"""Query a memstore table from a job outside the Ray cluster.

    memstore serve                        # on the cluster: prints the address; writes a
                                          # token to ~/.memstore/grpc-token
    python examples/grpc_client.py --address 127.0.0.1:50051 --table facts-mem0

Needs only this package's client (grpcio, protobuf, numpy): it imports neither Ray nor
torch. The token comes from $MEMSTORE_TOKEN or ~/.memstore/grpc-token. It goes in clear
only to a loopback address: another address needs --tls-ca (or --insecure).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from memstore.client import MemoryClient
from memstore.errors import RemoteError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--table", required=True)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--tls-ca", help="PEM root certificate(s) of the server: use TLS")
    parser.add_argument("--insecure", action="store_true", help="no TLS beyond loopback")
    ns = parser.parse_args()
    roots = open(ns.tls_ca, "rb").read() if ns.tls_ca else None
    with MemoryClient(ns.address, root_certificates=roots, insecure=ns.insecure) as client:
        info = client.describe(ns.table)
        print(f"{info['name']}: {info['rows']:,} rows x {info['dim']}, step {info['step']}")
        # Every reply says which step of each shard it saw.
        rows, seen = client.gather(ns.table, np.arange(4), with_seen=True)
        print(
            f"rows 0-3 {rows.shape} at shard steps {seen.shard_steps} "
            f"(whole steps: {seen.consistent})"
        )
        # A weighted lookup: y[b] = sum_m w[b, m] * values[idx[b, m]].
        idx = np.random.default_rng(0).integers(0, info["rows"], (2, 16))
        y = client.lookup(ns.table, idx, np.full(idx.shape, 1 / 16, np.float32))
        print(f"lookup of 2 x 16 rows -> {y.shape}")
        if info["keys_published"]:
            # Top-k over the product keys the trainer published; q is (B, H, Dk).
            q = (
                np.random.default_rng(1)
                .standard_normal((3, info["key_heads"], info["key_dim"]))
                .astype(np.float32)
            )
            result = client.query(ns.table, q, k=ns.k)
            print(f"top-{ns.k} rows of query 0, head 0: {result.indices[0, 0].tolist()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RemoteError as e:
        sys.exit(f"grpc_client: {e}")
