"""What every benchmark shares: the run's configuration and the paired timing loop.

Every figure is a ratio to a floor measured in the same run, in the same round, right
next to the subject: the machine is shared and noisy, so absolute nanoseconds move
between runs but the ratio of two neighbouring measurements barely does.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_REDIS_URL",
    "Config",
    "Paired",
    "loop_of",
    "measure_paired",
    "median",
    "ns_per_call",
    "paired_round",
    "redis_available",
    "scoped_loop_of",
]

DEFAULT_REDIS_URL = os.environ.get("CL_TOKENS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")

Call = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Config:
    """How much work each benchmark does (``--quick`` scales it down)."""

    quick: bool = False
    calls: int = 200_000  # calls per timing round on the hot path
    rounds: int = 7  # timing rounds; figures are medians over them
    slow_call_budget: float = 0.25  # seconds per round for subjects far slower than the floor
    stampede_callers: int = 10_000
    stampede_rounds: int = 6  # three sides, each in each position twice
    stampede_latency: float = 0.05
    processes: int = 16
    callers_per_process: int = 500
    xproc_rounds: int = 3
    scale_sizes: tuple[int, ...] = (1, 100, 10_000)
    memory_tokens: int = 10_000
    redis_url: str = DEFAULT_REDIS_URL
    only: tuple[str, ...] = field(default=())

    @classmethod
    def make(cls, *, quick: bool, redis_url: str, only: Sequence[str] = ()) -> Config:
        if quick:
            return cls(
                quick=True,
                calls=20_000,
                rounds=3,
                slow_call_budget=0.05,
                stampede_rounds=3,
                processes=4,
                callers_per_process=200,
                xproc_rounds=1,
                memory_tokens=2_000,
                redis_url=redis_url,
                only=tuple(only),
            )
        return cls(redis_url=redis_url, only=tuple(only))

    def wants(self, name: str) -> bool:
        return not self.only or name in self.only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


Loop = Callable[[int], Awaitable[None]]
CHUNK = 5_000  # floor calls per slice of a round (about a millisecond)


def loop_of(fn: Call) -> Loop:
    """A loop making ``n`` calls ``await fn()``: the shape every subject is timed in."""

    async def loop(n: int) -> None:
        for _ in range(n):
            await fn()

    return loop


def scoped_loop_of(fn: Callable[[str], Awaitable[Any]], scopes: Sequence[str]) -> Loop:
    """A loop making ``n`` calls ``await fn(scope)``, cycling over ``scopes`` across calls
    (and across slices, so every scope is visited)."""
    it = itertools.cycle(scopes)

    async def loop(n: int) -> None:
        for scope in itertools.islice(it, n):
            await fn(scope)

    return loop


async def ns_per_call(loop: Loop, calls: int) -> float:
    """Mean nanoseconds per call of ``loop(calls)`` (warm-ups and estimates)."""
    start = time.perf_counter_ns()
    await loop(calls)
    return (time.perf_counter_ns() - start) / calls


async def paired_round(
    floor: Loop, subject: Loop, floor_calls: int, subject_calls: int, *, first: str
) -> tuple[float, float, float]:
    """One round: floor and subject in alternating slices.

    A round is cut into slices of about ``CHUNK`` floor calls (about a millisecond),
    floor and subject taking turns (``first`` says who starts). Returns the floor's and
    the subject's mean ns per call over the round, and the round's ratio: the median
    over slices of (subject ns / floor ns of the neighbouring slice), so a burst of
    load from another process that hits one slice does not move it.

    The cyclic GC is disabled for the round (after a ``gc.collect()``), so a collection
    set off by earlier work does not land on one side only; reference counting still
    frees everything as usual.
    """
    slices = max(1, floor_calls // CHUNK)
    f_calls = max(1, floor_calls // slices)
    s_calls = max(1, subject_calls // slices)
    f_slices: list[int] = []
    s_slices: list[int] = []
    gc.collect()
    gc.disable()
    try:
        for i in range(slices):
            floor_first = (i % 2 == 0) == (first == "floor")
            for side in ("floor", "subject") if floor_first else ("subject", "floor"):
                start = time.perf_counter_ns()
                if side == "floor":
                    await floor(f_calls)
                    f_slices.append(time.perf_counter_ns() - start)
                else:
                    await subject(s_calls)
                    s_slices.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    ratio = median([(s / s_calls) / (f / f_calls) for f, s in zip(f_slices, s_slices, strict=True)])
    return sum(f_slices) / (f_calls * slices), sum(s_slices) / (s_calls * slices), ratio


@dataclass
class Paired:
    """A subject timed next to the floor, round by round."""

    name: str
    calls: int  # calls per round for the subject
    floor_calls: int
    floor_ns: list[float] = field(default_factory=list)
    subject_ns: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def add(self, round_result: tuple[float, float, float]) -> None:
        f_ns, s_ns, ratio = round_result
        self.floor_ns.append(f_ns)
        self.subject_ns.append(s_ns)
        self.ratios.append(ratio)

    @property
    def ratio(self) -> float:
        """Median over rounds of each round's ratio (see ``paired_round``)."""
        return median(self.ratios)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls_per_round": self.calls,
            "floor_calls_per_round": self.floor_calls,
            "rounds": len(self.ratios),
            "floor_ns_median": median(self.floor_ns),
            "subject_ns_median": median(self.subject_ns),
            "ratio_median": self.ratio,
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            "ratios": self.ratios,
            "floor_ns": self.floor_ns,
            "subject_ns": self.subject_ns,
        }


async def measure_paired(
    subjects: Mapping[str, Loop], floor: Loop, cfg: Config, *, floor_calls: int | None = None
) -> dict[str, Paired]:
    """Time each subject next to ``floor``, ``cfg.rounds`` rounds each (``paired_round``);
    who starts alternates from round to round.

    A subject much slower than the floor (I/O, locks) gets fewer calls per round, enough
    for about ``cfg.slow_call_budget`` seconds, never more than ``cfg.calls``.
    """
    floor_calls = floor_calls or cfg.calls
    await ns_per_call(floor, min(floor_calls, 10_000))  # warm up
    results: dict[str, Paired] = {}
    for name, loop in subjects.items():
        await ns_per_call(loop, 100)  # warm up
        estimate = await ns_per_call(loop, 200)
        calls = int(max(1_000, min(cfg.calls, cfg.slow_call_budget * 1e9 / estimate)))
        results[name] = Paired(name, calls, floor_calls)
    for round_no in range(cfg.rounds):
        for name, loop in subjects.items():
            paired = results[name]
            first = "floor" if round_no % 2 == 0 else "subject"
            paired.add(await paired_round(floor, loop, floor_calls, paired.calls, first=first))
    return results


async def redis_available(url: str) -> str | None:
    """None if Redis answers at ``url``, else why not (the redis benchmarks are skipped)."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return "the redis package is not installed"
    client = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        await client.ping()
    except Exception as exc:
        return f"Redis at {url} does not answer: {type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None
