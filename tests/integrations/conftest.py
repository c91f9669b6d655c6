"""Fixtures for the integration tests: an S3-protocol server on 127.0.0.1 (moto) and memory:// roots."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import fsspec
import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_names = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto's standalone mode), bound to 127.0.0.1 on a free port."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point s3fs at the test server, in this process (fsspec config) and in children (environment)."""
    env = {
        **_S3_ENV,
        "FSSPEC_S3_ENDPOINT_URL": s3_endpoint,
        "FSSPEC_S3_KEY": "testing",
        "FSSPEC_S3_SECRET": "testing",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    )
    return env


@pytest.fixture
def s3_root(s3_env: dict[str, str]) -> str:
    """`s3://BUCKET/run` in a fresh bucket of the test server."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/run"


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh `memory://` root, removed afterwards (the memory file system is process-global)."""
    name = f"/savepoint-test-{os.getpid()}-{next(_names)}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)
