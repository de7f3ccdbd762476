"""A bounded soak test: hundreds of callers, short-lived tokens, random endpoint faults.

Run it with ``pytest -m soak tests/test_soak.py`` (about 20 s; ``CL_TOKENS_SOAK_SECONDS``
and ``CL_TOKENS_SOAK_SEED`` change the length and the random seed). It prints its figures
whether or not pytest captures output.

What it asserts, precisely:

* No failed call while a valid token existed: a call that raised while the newest token
  the manager had handed out was still outside its safety margin (``expires_at - margin``,
  the margin being min(30 s, 25% of the lifetime)) counts as a failure. Calls that raise
  later, when a blocking fetch met an injected fault, are allowed and counted apart.
* No token handed out past its ``expires_at``: checked at return for ``token()``; for
  ``header()`` the header is matched to the token it carries.
* No token handed out inside its safety margin (within a small scheduling tolerance).
* Token requests stay within what the refresh cycle and the faults explain: every request
  is either an injected fault or a success, and successes are bounded by one per refresh
  interval (lifetime - refresh window - max jitter = 1.6 s for a 4 s token).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

import cl_tokens
from cl_tokens import Token, TokenError, TokenManager
from cl_tokens.testing import FakeAuthServer

pytestmark = pytest.mark.soak

DURATION = float(os.environ.get("CL_TOKENS_SOAK_SECONDS", "20"))
SEED = int(os.environ.get("CL_TOKENS_SOAK_SEED", str(int(time.time()) % 100_000)))
CALLERS = 300
EXPIRES_IN = 4.0
# Timing the manager derives from a 4 s token with the default tuning.
MARGIN = min(30.0, 0.25 * EXPIRES_IN)  # 1 s
REFRESH_INTERVAL = EXPIRES_IN - min(600.0, 0.5 * EXPIRES_IN) - min(60.0, 0.1 * EXPIRES_IN)  # 1.6 s
SCHEDULING_TOLERANCE = 0.05
PACKAGE_DIR = os.path.dirname(cl_tokens.__file__)


@dataclass
class Figures:
    calls: int = 0
    served: int = 0
    raised: int = 0
    failures_while_valid: list[str] = field(default_factory=list)
    raised_after_margin: Counter[str] = field(default_factory=Counter)
    expired_handouts: list[str] = field(default_factory=list)
    inside_margin_handouts: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    raised_latencies: list[float] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    newest: Token | None = None
    by_header: dict[str, Token] = field(default_factory=dict)
    unmatched_headers: list[tuple[float, str]] = field(default_factory=list)

    def saw(self, token: Token) -> None:
        self.by_header.setdefault(token.authorization, token)
        if self.newest is None or token.expires_at > self.newest.expires_at:
            self.newest = token

    def check_handout(self, token: Token, now: float, how: str) -> None:
        if token.expires_at <= now:
            self.expired_handouts.append(f"{how} {token!r} at {now:.3f}")
        elif now > token.expires_at - MARGIN + SCHEDULING_TOLERANCE:
            self.inside_margin_handouts.append(f"{how} {token!r} at {now:.3f}")


async def caller(
    manager: TokenManager, figures: Figures, rng: random.Random, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        use_header = rng.random() < 0.3
        started = time.monotonic()
        try:
            if use_header:
                value = (await manager.header())["Authorization"]
            else:
                token = await manager.token()
        except TokenError as exc:
            now = time.time()
            figures.calls += 1
            figures.raised += 1
            figures.raised_latencies.append(time.monotonic() - started)
            newest = figures.newest
            if newest is not None and now < newest.expires_at - MARGIN:
                figures.failures_while_valid.append(
                    f"{type(exc).__name__}: {exc} at {now:.3f}, newest token {newest!r} "
                    f"usable until {newest.expires_at - MARGIN:.3f}"
                )
            else:
                figures.raised_after_margin[type(exc).__name__] += 1
        else:
            now = time.time()
            figures.calls += 1
            figures.served += 1
            figures.latencies.append(time.monotonic() - started)
            if use_header:
                known = figures.by_header.get(value)
                if known is None:
                    figures.unmatched_headers.append((now, value))
                else:
                    figures.check_handout(known, now, "header()")
                    figures.saw(known)
            else:
                figures.check_handout(token, now, "token()")
                figures.saw(token)
        await asyncio.sleep(rng.uniform(0.005, 0.03))


async def inject_faults(
    server: FakeAuthServer, figures: Figures, rng: random.Random, stop: asyncio.Event
) -> None:
    """Random faults at random moments; a new one only once the last was (likely) consumed."""
    consumed_after = 0
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.1, 0.8))
        # At most about two faults wait in the server's queue: enough to fail whole
        # refreshes now and then, not enough to take the endpoint down for good.
        if server.token_requests < consumed_after - 1 or rng.random() < 0.2:
            continue
        kind = rng.choice(
            ["503", "503x2", "429", "502-html", "delay", "reset", "malformed", "malformed-html"]
        )
        count = 1
        if kind == "503":
            server.fail_next(1, 503)
        elif kind == "503x2":
            server.fail_next(2, 503)
            count = 2
        elif kind == "429":
            server.fail_next(1, 429, retry_after=rng.choice([0, 1]))
        elif kind == "502-html":
            server.fail_next(
                1, 502, body="<html><h1>502 Bad Gateway</h1></html>", content_type="text/html"
            )
        elif kind == "delay":
            server.delay_next(1, rng.uniform(0.6, 1.2))  # longer than attempt_timeout
        elif kind == "reset":
            server.reset_next(1)
        elif kind == "malformed":
            server.malformed_next(
                1, rng.choice(["not-json", "no-access-token", "negative-expires-in"])
            )
        else:
            server.malformed_next(1, "html")
        figures.faults[kind] += 1
        figures.faults["requests spoiled"] += count
        consumed_after = server.token_requests + count


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def test_soak(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    figures = Figures()
    stop = asyncio.Event()
    started = time.monotonic()
    async with FakeAuthServer(expires_in=EXPIRES_IN) as server:
        manager = TokenManager(
            "test-client-id",
            "test-client-secret",
            auth_url=server.url,
            attempts=3,
            attempt_timeout=0.5,
            fetch_deadline=2.0,
            backoff_base=0.05,
            backoff_cap=0.2,
        )
        try:
            workers = [
                asyncio.ensure_future(caller(manager, figures, random.Random(rng.random()), stop))
                for _ in range(CALLERS)
            ]
            injector = asyncio.ensure_future(inject_faults(server, figures, rng, stop))
            await asyncio.sleep(DURATION)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers, injector), timeout=30.0)
        finally:
            await asyncio.wait_for(manager.aclose(), timeout=10.0)
        elapsed = time.monotonic() - started
        leftover = [
            t
            for t in asyncio.all_tasks()
            if not t.done()
            and getattr(t.get_coro(), "cr_code", None) is not None
            and t.get_coro().cr_code.co_filename.startswith(PACKAGE_DIR)  # type: ignore[union-attr]
            and "testing" not in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
        ]
        token_requests = server.token_requests
        issued = len(server.issued)

    # Headers that were handed out before any token() call saw their token.
    still_unmatched = 0
    for now, value in figures.unmatched_headers:
        known = figures.by_header.get(value)
        if known is None:
            still_unmatched += 1
        else:
            figures.check_handout(known, now, "header()")

    spoiled = figures.faults.pop("requests spoiled", 0)
    injected = sum(figures.faults.values())
    successes_bound = elapsed / REFRESH_INTERVAL + 2
    request_bound = spoiled + 1.25 * successes_bound
    lines = [
        f"soak: {elapsed:.1f} s, seed {SEED}, {CALLERS} callers, tokens of {EXPIRES_IN:g} s",
        f"  calls: {figures.calls} ({figures.calls / elapsed:.0f}/s), served {figures.served}, "
        f"raised {figures.raised}",
        f"  failures while a valid token existed: {len(figures.failures_while_valid)}",
        f"  raised after the margin (blocking fetch met a fault): "
        f"{dict(figures.raised_after_margin) or 0}",
        f"  expired handouts: {len(figures.expired_handouts)}, inside the margin: "
        f"{len(figures.inside_margin_handouts)}, headers never matched: {still_unmatched}",
        f"  token requests: {token_requests} (bound {request_bound:.0f}), tokens issued: {issued}, "
        f"distinct tokens served: {len(figures.by_header)}",
        f"  faults injected: {injected} {dict(figures.faults)}",
        f"  latency: max {max(figures.latencies, default=0) * 1000:.1f} ms, "
        f"p99 {percentile(figures.latencies, 0.99) * 1000:.2f} ms, "
        f"median {statistics.median(figures.latencies or [0]) * 1000:.3f} ms; "
        f"slowest raised call {max(figures.raised_latencies, default=0) * 1000:.0f} ms",
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert figures.failures_while_valid == [], figures.failures_while_valid[:5]
    assert figures.expired_handouts == [], figures.expired_handouts[:5]
    assert figures.inside_margin_handouts == [], figures.inside_margin_handouts[:5]
    assert leftover == []
    assert figures.served >= 10 * CALLERS * DURATION  # the callers really did hammer it
    assert injected >= DURATION / 4  # the faults did happen
    # No refresh per call: each request is a fault or a success, successes one per cycle.
    assert token_requests <= request_bound, (token_requests, request_bound)
    # And the refreshes did keep up despite the faults: new tokens kept coming.
    assert len(figures.by_header) >= elapsed / (2 * EXPIRES_IN)
    assert still_unmatched <= 2
