"""Every bundled backend, plain and encrypted, against the shared contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
        if kind == "memory":
            backend = MemoryBackend()
        elif kind.startswith("file"):
            backend = FileBackend(tmp_path / "tokens", encryption_key=key)
        else:
            url: str = request.getfixturevalue("redis_url")
            backend = RedisBackend(url=url, encryption_key=key)
        try:
            yield backend
        finally:
            await backend.aclose()
            if isinstance(backend, RedisBackend):
                delete_keys(url, key_prefix)

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
