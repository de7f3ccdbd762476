"""A third-party backend, as its author ships it: a URL scheme declared in the entry-point
group ``cl_tokens.backends``, checked with the installed contract suite.

The distribution is simulated: a module written to a temporary directory on
``sys.path``, and ``importlib.metadata.entry_points`` answering for it.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cl_tokens import ConfigurationError, Settings, TokenManager
from cl_tokens.backends import MemoryBackend, TokenBackend, _base, backend_from_url, known_schemes
from cl_tokens.testing import FakeAuthServer
from cl_tokens.testing.backend_contract import BackendContract

GROUP = "cl_tokens.backends"

# A whole backend in a few lines: a dict, with leases on its locks.
DICT_BACKEND = """
import secrets
import time

from cl_tokens.backends import LockHandle, TokenBackend


class DictBackend(TokenBackend):
    # No ``schemes``: the entry point's name is its scheme.
    instances = []

    def __init__(self, name=""):
        self.name = name
        self.tokens = {}
        self.locks = {}
        DictBackend.instances.append(self)

    @classmethod
    def from_url(cls, url, **options):
        return cls(url.host or "")

    async def get(self, key):
        token = self.tokens.get(key)
        return token if token is not None and token.expires_at > time.time() else None

    async def set(self, key, token):
        self.tokens[key] = token

    async def delete(self, key, access_token=None):
        token = self.tokens.get(key)
        if token is None or (access_token is not None and token.access_token != access_token):
            return False
        del self.tokens[key]
        return True

    async def acquire_lock(self, key, *, lease):
        held = self.locks.get(key)
        if held is not None and held[1] > time.monotonic():
            return None
        owner = secrets.token_hex(8)
        self.locks[key] = (owner, time.monotonic() + lease)
        return LockHandle(key, owner)

    async def release_lock(self, handle):
        held = self.locks.get(handle.key)
        if held is not None and held[0] == handle.owner:
            del self.locks[handle.key]
"""


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Install a simulated distribution: ``install(scheme, source, attribute)`` writes
    ``source`` as a fresh module and declares ``scheme`` for its ``attribute``."""
    entries: list[importlib.metadata.EntryPoint] = []
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        if params.get("group") == GROUP:
            return importlib.metadata.EntryPoints(entries)
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry = dict(_base._REGISTRY)
    modules: list[str] = []

    def install(scheme: str, source: str = DICT_BACKEND, attribute: str = "DictBackend") -> str:
        module = f"third_party_backend_{uuid.uuid4().hex}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)
        entries.append(
            importlib.metadata.EntryPoint(name=scheme, value=f"{module}:{attribute}", group=GROUP)
        )
        _base._declared_schemes.cache_clear()
        return module

    yield install
    _base._REGISTRY.clear()
    _base._REGISTRY.update(registry)
    for module in modules:
        sys.modules.pop(module, None)
    monkeypatch.undo()
    _base._declared_schemes.cache_clear()


def test_a_declared_scheme_is_known_before_it_is_imported(
    installed: Callable[..., str],
) -> None:
    module = installed("dictstore")
    assert "dictstore" in known_schemes()
    assert module not in sys.modules  # looked up lazily: nothing imported yet
    backend = backend_from_url("dictstore://shelf")
    assert module in sys.modules
    assert type(backend).__name__ == "DictBackend"
    assert backend.name == "shelf"  # type: ignore[attr-defined]


def test_settings_and_the_environment_take_a_declared_scheme(
    installed: Callable[..., str],
) -> None:
    installed("dictstore")
    settings = Settings.from_env({"CL_CLIENT_ID": "x", "CL_TOKEN_BACKEND": "dictstore://"})
    assert settings.backend == "dictstore://"


async def test_a_manager_shares_tokens_through_a_declared_backend(
    installed: Callable[..., str], server: FakeAuthServer
) -> None:
    module = installed("dictstore")
    for _ in range(2):
        async with TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, backend="dictstore://"
        ) as manager:
            await manager.header()
    instances = sys.modules[module].DictBackend.instances
    assert len(instances) == 2  # one per manager, built from the URL
    assert instances[0].tokens  # the first manager wrote its token there
    assert server.token_requests == 2  # each manager owns a private dict: no sharing


def test_a_declared_backend_that_fails_to_import_is_named(
    installed: Callable[..., str],
) -> None:
    installed("broken", source="raise ImportError('needs libfoo')\n")
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url("broken://x")
    message = str(caught.value)
    assert "backend scheme 'broken'" in message
    assert "failed to load: ImportError: needs libfoo" in message
    assert GROUP in message


def test_a_declared_object_that_is_not_a_backend_is_refused(
    installed: Callable[..., str],
) -> None:
    installed("notabackend", source="class Thing:\n    pass\n", attribute="Thing")
    with pytest.raises(ConfigurationError, match="is not a TokenBackend subclass"):
        backend_from_url("notabackend://x")


def test_a_bundled_scheme_cannot_be_taken_over(installed: Callable[..., str]) -> None:
    # An attacker's (or a careless) distribution declares "memory": it is never loaded.
    module = installed("memory")
    assert isinstance(backend_from_url("memory://"), MemoryBackend)
    assert module not in sys.modules


def test_an_unknown_scheme_lists_the_declared_ones(installed: Callable[..., str]) -> None:
    installed("dictstore")
    with pytest.raises(ConfigurationError, match=r"known schemes: .*dictstore"):
        backend_from_url("nosuch://x")


def test_broken_metadata_does_not_break_the_bundled_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(**params: Any) -> Any:
        raise RuntimeError("a distribution with corrupt metadata")

    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    _base._declared_schemes.cache_clear()
    try:
        assert {"file", "memory"} <= set(known_schemes())
        assert isinstance(backend_from_url("memory://"), MemoryBackend)
    finally:
        monkeypatch.undo()
        _base._declared_schemes.cache_clear()


class TestDeclaredBackendContract(BackendContract):
    """The installed contract suite, run as a third-party author runs it."""

    @pytest.fixture
    async def backend(
        self, installed: Callable[..., str], key_prefix: str
    ) -> AsyncIterator[TokenBackend]:
        installed("dictstore")
        async with backend_from_url("dictstore://") as backend:
            yield backend
