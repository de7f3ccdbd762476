"""Every bundled backend, plain and encrypted, against the shared contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import pytest
from backend_contract import BackendContract
from redis_support import delete_keys, redis_url  # noqa: F401 - redis_url is a fixture

from cl_tokens.backends import FileBackend, MemoryBackend, RedisBackend, TokenBackend

ALL_BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("file", id="file"),
    pytest.param("file+encrypted", id="file-encrypted"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
    pytest.param("redis+encrypted", marks=pytest.mark.redis, id="redis-encrypted"),
    pytest.param("cluster", marks=pytest.mark.redis, id="redis-cluster"),
    pytest.param("cluster+encrypted", marks=pytest.mark.redis, id="redis-cluster-encrypted"),
    pytest.param("sentinel", marks=pytest.mark.redis, id="redis-sentinel"),
    pytest.param("sentinel+encrypted", marks=pytest.mark.redis, id="redis-sentinel-encrypted"),
    pytest.param("valkey", marks=pytest.mark.redis, id="valkey"),
    pytest.param("valkey+encrypted", marks=pytest.mark.redis, id="valkey-encrypted"),
]


class TestBackendContract(BackendContract):
    @pytest.fixture(params=ALL_BACKENDS)
    async def backend(
        self, request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
    ) -> AsyncIterator[TokenBackend]:
        kind: str = request.param
        key = None
        if kind.endswith("+encrypted"):
            from cryptography.fernet import Fernet  # a test dependency: never skipped

            key = Fernet.generate_key()
        backend: TokenBackend
        cleanup: Callable[[str], object] | None = None
        if kind == "memory":
            backend = MemoryBackend()
        elif kind.startswith("file"):
            backend = FileBackend(tmp_path / "tokens", encryption_key=key)
        elif kind.startswith(("redis", "valkey")):
            url: str = request.getfixturevalue(kind.split("+")[0] + "_url")
            backend = RedisBackend(url=url, encryption_key=key)
            cleanup = partial(delete_keys, url)
        else:
            topology = request.getfixturevalue("redis_" + kind.split("+")[0])
            backend = RedisBackend(url=topology.url, encryption_key=key)
            cleanup = topology.delete_keys
        try:
            yield backend
        finally:
            await backend.aclose()
            if cleanup is not None:
                cleanup(key_prefix)

    async def stored_bytes(self, backend: TokenBackend, key_prefix: str) -> bytes | None:
        if isinstance(backend, FileBackend):
            files = sorted(backend.directory.iterdir())
            return b"".join(p.name.encode() + b"=" + p.read_bytes() for p in files)
        if isinstance(backend, RedisBackend):
            client = backend.client
            chunks = []
            async for name in client.scan_iter(match="{" + key_prefix + "*"):
                chunks.append(name + b"=" + (await client.get(name) or b""))
            return b"".join(chunks)
        return None
