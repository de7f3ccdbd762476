"""OpenTelemetry metrics, read with the SDK's in-memory reader: each instrument after a
cold fetch, a failed fetch and a lock wait; no secret, token or owner in attributes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cl_tokens import TokenEndpointError, TokenManager
from cl_tokens._metrics import metrics
from cl_tokens.backends import MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    otel.set_meter_provider(MeterProvider(metric_readers=[reader]))
    metrics._ready = False  # instruments come from the provider set above
    metrics.enabled = False
    return reader


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


async def test_each_instrument_reports_and_no_attribute_carries_a_secret(
    reader: InMemoryMetricReader,
) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        shared = MemoryBackend()
        owner = server.customers.add("ann@example.com", "pw-123456")
        first = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=shared)
        second = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=shared)
        server.latency = 0.2
        # A cold fetch by one manager while the other waits for its lock.
        token, _ = await asyncio.gather(first.token(), second.token())
        server.latency = 0.0
        customer = await first.login("ann@example.com", "pw-123456")
        server.fail_next(1, 429, retry_after=30)
        with pytest.raises(TokenEndpointError):
            await first.header(scope="market:code:other")
        seen = points(reader)
        await first.aclose()
        await second.aclose()

    requests = {
        (p.attributes["grant"], p.attributes["outcome"]): p.value
        for p in seen["cl_tokens.token.requests"]
    }
    assert requests[("client_credentials", "ok")] >= 1
    assert requests[("client_credentials", "rate_limited")] == 1
    assert requests[("password", "ok")] == 1
    assert sum(p.count for p in seen["cl_tokens.token.fetch.duration"]) >= 2
    tiers = {p.attributes["tier"]: p.value for p in seen["cl_tokens.cache.misses"]}
    assert tiers["memory"] >= 2
    assert tiers["shared"] >= 2
    assert sum(p.count for p in seen["cl_tokens.lock.wait.duration"]) >= 2
    assert max(p.max for p in seen["cl_tokens.lock.wait.duration"]) >= 0.1  # it waited
    left = seen["cl_tokens.token.time_left"]
    assert {p.attributes["kind"] for p in left} == {"app", "customer"}
    assert all(0 < p.value <= 7200 for p in left)
    text = repr(seen)
    for secret in (SECRET, token.access_token, customer.access_token, owner):
        assert secret not in text


async def test_backend_errors_are_counted(reader: InMemoryMetricReader) -> None:
    class Broken(MemoryBackend):
        async def get(self, key: str) -> Any:
            raise OSError("disk on fire")

    before = sum(p.value for p in points(reader).get("cl_tokens.backend.errors", []))
    async with FakeAuthServer(client_secret=SECRET) as server:
        manager = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=Broken())
        await manager.header()
        await manager.aclose()
    after = sum(p.value for p in points(reader)["cl_tokens.backend.errors"])
    assert after > before


async def test_a_warm_header_calls_no_metrics(
    reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        manager = TokenManager(server.client_id, SECRET, auth_url=server.url)
        await manager.header()  # cold: counted

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a metrics call on the hot path")

        for name in ("token_request", "fetch_duration", "cache_miss", "lock_wait", "now"):
            monkeypatch.setattr(metrics, name, refuse)
        for _ in range(1000):
            await manager.header()
        monkeypatch.undo()
        await manager.aclose()
