"""Shared fixtures: a real FakeAuthServer per test and managers closed at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cl_tokens import TokenManager
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


@pytest.fixture
async def server() -> AsyncIterator[FakeAuthServer]:
    async with FakeAuthServer(client_secret=SECRET) as fake:
        yield fake


@pytest.fixture
async def make_manager(server: FakeAuthServer) -> AsyncIterator[Callable[..., TokenManager]]:
    """Build managers pointed at ``server``; every one is closed after the test."""
    made: list[TokenManager] = []

    def make(**kwargs: Any) -> TokenManager:
        kwargs.setdefault("auth_url", server.url)
        client_id = kwargs.pop("client_id", server.client_id)
        client_secret = kwargs.pop("client_secret", server.client_secret)
        manager = TokenManager(client_id, client_secret, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.aclose()


# Redis fixtures (redis_url, redis_key_prefix, redis_server) live with their helpers.
# Session fixtures are defined once, here: imported into two test modules they would be
# two fixtures, and start two clusters.
from redis_support import redis_key_prefix, redis_server, redis_url  # noqa: E402
from redis_topologies import redis_cluster, redis_sentinel, valkey_url  # noqa: E402

__all__ = [
    "make_manager",
    "redis_cluster",
    "redis_key_prefix",
    "redis_sentinel",
    "redis_server",
    "redis_url",
    "server",
    "valkey_url",
]
