"""The protocol as a product: committed stubs match the proto, the proto alone is
enough for a client, and memstore.client stays light."""

from __future__ import annotations

import filecmp
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import torch

import memstore
import memstore.server as ms

from .grpc_util import READER, TOKENS

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO = REPO / "protos" / "memstore" / "v1" / "memstore.proto"


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    """Fails when the proto or the pinned grpcio-tools changed without regenerating:
    run `python protos/generate.py` and commit memstore/v1/."""
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "memstore" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["memstore_pb2.py", "memstore_pb2.pyi", "memstore_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(fresh, REPO / "memstore" / "v1", names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_pinned_grpcio_tools_is_the_installed_one():
    from importlib.metadata import version

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"grpcio-tools=={version("grpcio-tools")}"' in pyproject


def test_client_imports_neither_ray_nor_torch():
    code = (
        "import sys, memstore.client\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'triton'} "
        "| {m for m in sys.modules} & {'memstore.trainer', 'memstore.kernels'})\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _only(tmp_path: pathlib.Path, modules: list) -> pathlib.Path:
    """A directory holding links to just these installed top-level packages."""
    site = tmp_path / "site"
    site.mkdir()
    for module in modules:
        root = pathlib.Path(module.__file__).resolve()
        if root.name == "__init__.py":  # a package: up to its top level (google/ for protobuf)
            root = root.parents[module.__name__.count(".")]
        (site / root.name).symlink_to(root)
        for extra in root.parent.glob(f"{root.name}.libs"):  # wheels' vendored libraries
            (site / extra.name).symlink_to(extra)
    return site


CLIENT = textwrap.dedent("""
    import json, sys
    import grpc, numpy as np
    import memstore_pb2 as pb, memstore_pb2_grpc as pb_grpc
    for name in ("memstore.client", "ray", "torch"):
        try:
            __import__(name)
        except ImportError:
            continue
        sys.exit(f"{name} is importable")
    address, token, idx_file = sys.argv[1:]
    idx = np.load(idx_file)
    w = np.ones(idx.shape, "<f4")
    stub = pb_grpc.MemoryStoreStub(grpc.insecure_channel(address))
    meta = (("authorization", "Bearer " + token),)
    request = pb.LookupRequest(
        table="proto-t",
        idx=pb.Tensor(dtype=pb.INT64, shape=idx.shape, data=idx.astype("<i8").tobytes()),
        w=pb.Tensor(dtype=pb.FLOAT32, shape=w.shape, data=w.tobytes()))
    reply = stub.Lookup(request, metadata=meta)
    y = np.frombuffer(reply.y.data, "<f4").reshape(tuple(reply.y.shape))
    tables = [t.name for t in stub.ListTables(pb.ListTablesRequest(), metadata=meta).tables]
    print(json.dumps({"y": y.tolist(), "step": reply.seen.step, "tables": tables}))
""")


def test_stubs_from_the_proto_alone_query_a_running_server(ray_start_16_cpus, tmp_path):
    """protoc (grpcio-tools) on the .proto file alone, then a client in an interpreter
    that can import only grpcio (and its dependency typing-extensions), protobuf,
    numpy and those stubs."""
    import google.protobuf
    import grpc
    import typing_extensions
    from grpc_tools import protoc

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{PROTO.parent}",
                f"--python_out={stubs}",
                f"--grpc_python_out={stubs}",
                str(PROTO),
            ]
        )
        == 0
    )
    (stubs / "client.py").write_text(CLIENT)
    site = _only(tmp_path, [grpc, typing_extensions, google.protobuf, np])
    table = memstore.create_table("proto-t", 256, 8, shards=2, seed=5)
    server = ms.start(ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS))
    try:
        idx = np.array([[0, 255], [17, 17], [128, 3]])
        np.save(tmp_path / "idx.npy", idx)
        # -I: no user site, no PYTHONPATH; -S: no site-packages at all; the path is set here.
        boot = (
            f"import sys; sys.path[:0] = [{str(stubs)!r}, {str(site)!r}]; "
            f"sys.argv = ['client.py'] + sys.argv[1:]; "
            f"exec(compile(open({str(stubs / 'client.py')!r}).read(), 'client.py', 'exec'))"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                boot,
                server.address,
                READER,
                str(tmp_path / "idx.npy"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        expect = table.lookup(torch.from_numpy(idx), torch.ones(idx.shape))
        np.testing.assert_allclose(np.array(answer["y"]), expect.numpy(), rtol=1e-6)
        assert answer["step"] == 0 and "proto-t" in answer["tables"]
    finally:
        server.stop()
        memstore.drop_table("proto-t")
