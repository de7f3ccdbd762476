"""A worker of the customer soak: coroutines ask for random customers' tokens until the end.

Run as ``python tests/customer_soak_worker.py CONFIG_JSON``; prints ``{"ready": true}``,
reads the start time (unix seconds) from stdin, and prints one JSON line of figures at
the end. With ``"victim_after"`` set, the worker is the one the test kills:
the first time, after that many seconds, that it holds a customer's lock and is about to
mark and send the refresh token, it stops there (and every later renewal too), waits for
the renewals already sending to end, prints ``{"holding": <cache key>}``, and waits, lock
held, for the test to kill it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from typing import Any

from cl_tokens import LoginRequiredError, Token, TokenManager


async def main() -> None:
    if os.environ.get("CL_TOKENS_SOAK_DEBUG"):
        logging.basicConfig(level=logging.INFO, format="%(created).3f %(process)d %(message)s")
    config: dict[str, Any] = json.loads(sys.argv[1])
    rng = random.Random(config["seed"])
    owners: list[str] = config["owners"]
    margin = 0.25 * config["expires_in"]
    figures: dict[str, Any] = {
        "calls": 0,
        "served": 0,
        "invalidations": 0,
        "login_required": 0,
        "expired": 0,
        "expired_hot": 0,
        "expired_resumed": 0,
        "inside_margin": 0,
        "errors": Counter(),
        "send_errors": Counter(),
        "expired_how": Counter(),
        "max_latency": 0.0,
        "max_gap": 0.0,
        "max_lag": 0.0,
    }
    warnings: Counter[str] = Counter()

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings[str(record.msg)[:100]] += 1

    logging.getLogger("cl_tokens").addHandler(Count(logging.WARNING))
    async with TokenManager(
        config["client_id"],
        config["client_secret"],
        auth_url=config["auth_url"],
        backend=config["backend"],
        encryption_key=config["key"],
        **config.get("tuning", {}),
    ) as manager:
        # Starting 16 interpreters on a loaded machine takes seconds: the test gives the
        # start time once every worker is ready.
        print(json.dumps({"ready": True}), flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = float(line)
        end = start + config["duration"]
        request = manager._endpoint.request
        durations: list[float] = []

        async def timed(*args: Any, **kwargs: Any) -> Token:
            began = time.monotonic()
            try:
                return await request(*args, **kwargs)
            finally:
                durations.append(time.monotonic() - began)

        manager._endpoint.request = timed  # type: ignore[method-assign]
        sent = manager._send_refresh

        async def counted(key: str, *args: Any) -> Token:
            try:
                return await sent(key, *args)
            except BaseException as exc:
                figures["send_errors"][f"{type(exc).__name__}: {exc}"[:120]] += 1
                raise

        manager._send_refresh = counted  # type: ignore[method-assign]
        victim_after = config.get("victim_after")
        if victim_after is not None:
            send = manager._send_refresh
            sending = [0]  # renewals past the gate: marked, maybe sent
            stopped = asyncio.Event()

            async def stop_holding(key: str, *args: Any) -> Token:
                if time.time() >= start + victim_after and manager._shared.holds(key):
                    # Hold this lock, unmarked; let the renewals already sending finish
                    # (a kill after a send would spend a token: the in-flight tests show
                    # that case), and stop every later one at this gate too.
                    if not stopped.is_set():
                        stopped.set()
                        since = time.time()
                        while sending[0]:
                            await asyncio.sleep(0.01)
                        print(json.dumps({"holding": key, "since": since}), flush=True)
                    await asyncio.Event().wait()  # lock held, nothing sent: kill me now
                if stopped.is_set():
                    await asyncio.Event().wait()
                sending[0] += 1
                try:
                    return await send(key, *args)
                finally:
                    sending[0] -= 1

            manager._send_refresh = stop_holding  # type: ignore[method-assign]

        async def lag_probe() -> None:
            # How late the loop runs: a token served hot is only as fresh as its timers.
            while time.time() < end:
                before = time.monotonic()
                await asyncio.sleep(0.05)
                lag = time.monotonic() - before - 0.05
                figures["max_lag"] = max(figures["max_lag"], lag)

        async def caller() -> None:
            last_served = time.monotonic()
            while time.time() < end:
                owner = rng.choice(owners)
                began = time.monotonic()
                figures["calls"] += 1
                hot = manager._hot_tokens.get((None, owner))
                try:
                    token = await manager.token(customer=owner)
                except LoginRequiredError as exc:
                    figures["login_required"] += 1
                    figures["errors"][f"LoginRequiredError: {exc}"[:200]] += 0
                    continue
                except Exception as exc:  # counted and reported, never hidden
                    figures["errors"][f"{type(exc).__name__}: {exc}"[:200]] += 1
                    continue
                now = time.time()  # no await since the token came back
                done = time.monotonic()
                figures["served"] += 1
                if now >= token.expires_at:
                    figures["expired"] += 1
                    # Served from the hot tier (its retirement timer late), or handed to a
                    # caller waiting on a renewal that this loop resumed late.
                    where = "hot" if token is hot else "resumed"
                    figures[f"expired_{where}"] += 1
                    figures["expired_how"][f"{where}, {now - token.expires_at:.2f} s late"] += 1
                elif now >= token.expires_at - margin:
                    figures["inside_margin"] += 1
                figures["max_latency"] = max(figures["max_latency"], done - began)
                figures["max_gap"] = max(figures["max_gap"], done - last_served)
                last_served = done
                if rng.random() < config["invalidate_rate"]:
                    figures["invalidations"] += 1
                    await manager.invalidate(token.access_token, customer=owner)
                await asyncio.sleep(rng.uniform(0.005, 0.03))

        await asyncio.sleep(max(0.0, start - time.time()))
        await asyncio.gather(lag_probe(), *(caller() for _ in range(config["coroutines"])))
    figures["errors"] = dict(figures["errors"])
    figures["send_errors"] = dict(figures["send_errors"])
    figures["warnings"] = dict(warnings)
    figures["expired_how"] = dict(figures["expired_how"])
    durations.sort()
    figures["requests"] = len(durations)
    figures["request_p50"] = durations[len(durations) // 2] if durations else 0.0
    figures["request_max"] = durations[-1] if durations else 0.0
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
