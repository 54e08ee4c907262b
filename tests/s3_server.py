"""A real S3-compatible server for the tests: moto_server on 127.0.0.1 with one bucket."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# moto accepts any credentials; these keep boto and pyarrow off the real metadata service.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class S3Server:
    """A running moto_server: its process, command line, pyarrow filesystem and bucket."""

    process: subprocess.Popen
    command: str
    endpoint: str
    bucket: str
    fs: object  # pyarrow.fs.S3FileSystem

    def uri(self, key: str) -> str:
        """The s3:// URI of `key` in the bucket, pointed at this server."""
        return f"s3://{self.bucket}/{key}?endpoint_override={self.endpoint}&scheme=http"


def _wait_for_port(server: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert server.poll() is None, f"moto_server exited with {server.returncode}"
            assert time.monotonic() < deadline, f"moto_server not listening after {timeout} s"
            time.sleep(0.1)


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[S3Server]:
    """Start moto_server on a free loopback port, create `bucket`, stop it on exit."""
    import pyarrow.fs as pafs

    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        pytest.skip(f"no moto_server at {moto} (the test extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(server, port)
        endpoint = f"127.0.0.1:{port}"
        fs = pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=CREDENTIALS["AWS_DEFAULT_REGION"],
            scheme="http",
            endpoint_override=endpoint,
            allow_bucket_creation=True,
        )
        fs.create_dir(bucket)
        yield S3Server(server, " ".join(command), endpoint, bucket, fs)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
