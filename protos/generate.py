"""Generate the Python modules of the memstore.v1 protocol (the one way to make them).

    python protos/generate.py            # writes memstore/v1/memstore_pb2{.py,.pyi,_grpc.py}
    python protos/generate.py --out DIR  # the same files under DIR/memstore/v1/

The output depends on the grpcio-tools version (it stamps its version into the
stubs), so the test extra of pyproject.toml pins the one the committed files were
made with, and tests/memstore/test_grpc_proto.py fails when regenerating changes a
file.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO = "memstore/v1/memstore.proto"
OUTPUTS = ("memstore_pb2.py", "memstore_pb2.pyi", "memstore_pb2_grpc.py")


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc (grpcio-tools) on the proto; returns the files written."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO_DIR / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "memstore" / "v1" / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=ROOT,
        help="root the memstore/v1/ files go under (default: the repository)",
    )
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
