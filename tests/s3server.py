"""A real S3-compatible HTTP server for the URL-store tests: moto's server mode (the one s3fs's own tests
use), started as a separate process on a free localhost port. Not a mocked client: s3fs talks HTTP to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self, key: str = "testing", secret: str = "testing") -> dict[str, str]:
        """What a client process needs: the endpoint and credentials, in the usual places for s3fs/botocore."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def new_bucket(self) -> str:
        """A fresh bucket (one per test), created over HTTP as any client would."""
        name = f"flannel-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str] | None = None) -> S3Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the moto S3 server did not start on {endpoint}") from None
            time.sleep(0.2)
    return S3Server(endpoint, process)


def stop_server(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server for this test process (under xdist, one per worker)."""
    pytest.importorskip("s3fs", reason="the URL-store tests need s3fs (pip install -e '.[test]')")
    server = start_server()
    yield server
    stop_server(server)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Server, str]]:
    """(server, a fresh bucket), with this process's environment pointing s3fs at the server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    yield s3_server, s3_server.new_bucket()
