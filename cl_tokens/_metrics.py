"""OpenTelemetry metrics, when the ``opentelemetry-api`` package is installed
(``pip install 'cl-tokens[otel]'``); otherwise every call here is a no-op.

Meter ``cl_tokens``:

- ``cl_tokens.token.requests`` (counter; ``grant``, ``outcome``: ok, rejected,
  rate_limited, error): requests sent to the token endpoint;
- ``cl_tokens.token.fetch.duration`` (histogram, s): a fetch, all its attempts included;
- ``cl_tokens.cache.misses`` (counter; ``tier``: memory, shared);
- ``cl_tokens.lock.wait.duration`` (histogram, s): waiting for the backend's lock;
- ``cl_tokens.backend.errors`` (counter);
- ``cl_tokens.token.time_left`` (observable gauge, s; ``scope``, ``kind``: app,
  customer): per cached key, the least time left.

Attributes never carry a secret, a token or an owner id. Nothing here runs on the hot
path: a warm ``header()`` is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["metrics"]


class _Metrics:
    """The instruments, created once, on first use, from the global meter provider."""

    def __init__(self) -> None:
        self.enabled = False
        self._ready = False
        self._sources: list[Callable[[], Iterable[tuple[float, dict[str, str]]] | None]] = []

    def _setup(self) -> None:
        self._ready = True
        try:
            from opentelemetry import metrics as otel
        except ImportError:
            return
        meter = otel.get_meter("cl_tokens")
        self._requests = meter.create_counter(
            "cl_tokens.token.requests", description="requests sent to the token endpoint"
        )
        self._fetch = meter.create_histogram(
            "cl_tokens.token.fetch.duration", unit="s", description="a fetch, all attempts"
        )
        self._misses = meter.create_counter("cl_tokens.cache.misses", description="cache misses")
        self._lock_wait = meter.create_histogram(
            "cl_tokens.lock.wait.duration", unit="s", description="waiting for a backend lock"
        )
        self._backend_errors = meter.create_counter(
            "cl_tokens.backend.errors", description="shared backend failures"
        )
        meter.create_observable_gauge(
            "cl_tokens.token.time_left",
            callbacks=[self._observe],
            unit="s",
            description="seconds left on each cached token",
        )
        self.enabled = True

    def _check(self) -> bool:
        if not self._ready:
            self._setup()
        return self.enabled

    def watch(self, source: Callable[[], Iterable[tuple[float, dict[str, str]]] | None]) -> None:
        """Report ``source()``'s (seconds left, attributes) through the gauge; a source
        that returns None (its manager was collected) is dropped."""
        if self._check():
            self._sources.append(source)

    def unwatch(self, source: Callable[[], Iterable[tuple[float, dict[str, str]]] | None]) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def _observe(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        least: dict[tuple[tuple[str, str], ...], float] = {}
        for source in list(self._sources):
            observed = source()
            if observed is None:
                self.unwatch(source)
                continue
            for left, attributes in observed:
                key = tuple(sorted(attributes.items()))
                least[key] = min(left, least.get(key, left))
        return [Observation(left, dict(key)) for key, left in least.items()]

    def token_request(self, grant: str, outcome: str) -> None:
        if self._check():
            self._requests.add(1, {"grant": grant, "outcome": outcome})

    def fetch_duration(self, seconds: float) -> None:
        if self._check():
            self._fetch.record(seconds)

    def cache_miss(self, tier: str) -> None:
        if self._check():
            self._misses.add(1, {"tier": tier})

    def lock_wait(self, seconds: float) -> None:
        if self._check():
            self._lock_wait.record(seconds)

    def backend_error(self) -> None:
        if self._check():
            self._backend_errors.add(1)

    @staticmethod
    def now() -> float:
        return time.perf_counter()


metrics = _Metrics()
