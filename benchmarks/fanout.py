"""The cross-process floor: a bare Redis pub/sub fan-out to as many processes.

What no shared token cache can beat when waking other processes: one message published
to Redis, received by every subscriber process, each waking as many coroutines as the
cross-process benchmark runs per process (they await one future the message resolves).
No locks, no reads, no decoding, no library.

Subscriber protocol (``python -m benchmarks.fanout --redis-url U --channel C``): connect
and subscribe, print ``READY``, wait for one message on the channel, print
``RESULT <json>`` with when it was received and when each coroutine was served.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["pubsub_fanout_round"]

ROOT = Path(__file__).resolve().parent.parent


async def pubsub_fanout_round(
    redis_url: str, processes: int, callers: int, payload_bytes: int
) -> dict[str, Any]:
    """One fan-out: start ``processes`` subscribers, publish once, gather their times.

    Waits are measured like the cross-process benchmark's: from the moment the message
    was certainly in Redis, the publish returning or, if earlier, the first receipt.
    """
    import redis.asyncio as aioredis

    from .stampede import _percentile

    channel = f"cl_tokens_bench:fanout:{secrets.token_hex(6)}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    args = ["--redis-url", redis_url, "--channel", channel, "--callers", str(callers)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.fanout",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
            env=env,
        )
        for _ in range(processes)
    ]
    client = aioredis.from_url(redis_url)
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if line.strip() != b"READY":
                raise RuntimeError(f"subscriber did not get ready: {line!r}")
        await client.ping()
        # Like the followers of a fetch, the subscribers sit idle for a while first.
        await asyncio.sleep(0.25)
        published_at = time.time()
        receivers = await client.publish(channel, b"x" * payload_bytes)
        returned_at = time.time()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate() for proc in procs)), 120
        )
    except BaseException:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        raise
    finally:
        await client.aclose()
    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"subscriber failed ({proc.returncode}): {err.decode()[-2000:]}")
        lines = [x for x in out.decode().splitlines() if x.startswith("RESULT ")]
        reports.append(json.loads(lines[-1][len("RESULT ") :]))
    t0 = min([returned_at] + [r["received_at"] for r in reports])
    waits = [t - t0 for r in reports for t in r["served_at"]]
    received = [r["received_at"] - t0 for r in reports]
    return {
        "receivers": receivers,
        "publish_round_trip_s": returned_at - published_at,
        "wait_p50_s": _percentile(waits, 50),
        "wait_p99_s": _percentile(waits, 99),
        "wait_max_s": max(waits),
        "received_p50_s": _percentile(received, 50),
        "received_p99_s": _percentile(received, 99),
        "received_max_s": max(received),
    }


async def _subscribe(redis_url: str, channel: str, callers: int) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=5.0)  # the subscribe confirmation
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[bytes] = loop.create_future()

    async def caller() -> float:
        await arrived
        return time.time()

    tasks = [asyncio.ensure_future(caller()) for _ in range(callers)]
    gc.collect()  # as benchmarks.worker does, before the timed part
    print("READY", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            received_at = time.time()
            arrived.set_result(message["data"])
            break
    else:
        raise SystemExit("no message within 60 s")
    served = await asyncio.gather(*tasks)
    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
    await client.aclose()
    print("RESULT " + json.dumps({"received_at": received_at, "served_at": served}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--callers", type=int, default=500)
    args = parser.parse_args(argv)
    asyncio.run(_subscribe(args.redis_url, args.channel, args.callers))


if __name__ == "__main__":
    main()
