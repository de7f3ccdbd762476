"""A burst of callers that met the same 401 costs the shared backend one delete.

Found by the multi-host benchmark (``python -m benchmarks --only hosts``): 50 callers per
process invalidating at once sent 50 deletes each, which opened 50 Redis connections at
once per process; on a loaded machine some timed out, the backend was taken for down and
processes fetched around it.
"""

from __future__ import annotations

import asyncio

from cl_tokens import Token, TokenManager
from cl_tokens.backends import MemoryBackend
from cl_tokens.testing import FakeAuthServer


class CountingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.deletes = 0

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        self.deletes += 1
        await asyncio.sleep(0.01)  # a round trip, so the callers overlap as on Redis
        return await super().delete(key, access_token)


async def test_fifty_callers_that_met_the_same_401_share_one_delete_and_one_fetch() -> None:
    async with FakeAuthServer() as server:
        backend = CountingBackend()
        async with TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, backend=backend
        ) as manager:
            stale = (await manager.token()).access_token
            server.expire(stale)

            async def met_a_401() -> Token:
                await manager.invalidate(stale)
                return await manager.token()

            tokens = await asyncio.gather(*(met_a_401() for _ in range(50)))
        assert backend.deletes == 1
        assert server.token_requests == 2
        assert {t.access_token for t in tokens} == {server.issued[-1]}
        assert server.is_live(server.issued[-1])


async def test_an_invalidation_after_the_burst_deletes_again() -> None:
    async with FakeAuthServer() as server:
        backend = CountingBackend()
        async with TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, backend=backend
        ) as manager:
            first = (await manager.token()).access_token
            assert await manager.invalidate(first)
            second = (await manager.token()).access_token
            assert await manager.invalidate(second)
        assert backend.deletes == 2
