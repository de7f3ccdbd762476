"""A backend's own few daemon threads for blocking file calls.

Why not ``anyio.to_thread`` or the loop's default executor: both share one pool (40
threads in anyio's default limiter) with the rest of the application. A Starlette or
FastAPI app with busy sync endpoints fills it, and every file call then queues behind
them past ``backend_timeout``: the store looks down when only the app is busy. And
why not a ``ThreadPoolExecutor``: its threads are joined at exit, so one file call
that never returns (a hung NFS mount, a FIFO) keeps the process alive for ever.

The threads here are daemon threads, started on demand up to ``max_threads`` and
retired after ``idle`` seconds without work. A call whose caller gave up (a timeout,
a cancellation) while it runs is *stuck*: once ``max_stuck`` are, new calls fail at
once instead of piling up threads on a filesystem that does not answer, until one of
them returns. A call abandoned before it started never starts.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .._errors import BackendError

__all__ = ["DaemonPool"]

_R = TypeVar("_R")

_QUEUED, _RUNNING, _DONE, _DROPPED = range(4)


class _Job(Generic[_R]):
    __slots__ = ("abandoned", "args", "func", "future", "loop", "state")

    def __init__(
        self,
        func: Callable[..., _R],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[_R],
    ) -> None:
        self.func = func
        self.args = args
        self.loop = loop
        self.future = future
        self.state = _QUEUED
        self.abandoned = False


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return  # the caller gave up
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class DaemonPool:
    """Runs blocking calls on a few daemon threads of its own.

    Args:
        name: prefix of the thread names (seen in ``py-spy`` and thread dumps).
        max_threads: the most threads running at once.
        max_stuck: abandoned calls still running at which new calls fail at once;
            below ``max_threads``, so healthy calls always have threads left.
        idle: seconds a thread waits for work before it ends.
    """

    def __init__(
        self, name: str, *, max_threads: int = 8, max_stuck: int = 4, idle: float = 10.0
    ) -> None:
        if not 0 < max_stuck < max_threads:
            raise ValueError("need 0 < max_stuck < max_threads")
        self._name = name
        self._max_threads = max_threads
        self._max_stuck = max_stuck
        self._idle_timeout = idle
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Job[Any]] = collections.deque()
        self._threads = 0  # alive, idle or busy
        self._idle = 0  # waiting for work
        self._stuck = 0  # running calls whose callers gave up
        self._retire = False  # idle threads end now (aclose)
        self._serial = 0

    @property
    def threads(self) -> int:
        """Threads alive now."""
        return self._threads

    @property
    def stuck(self) -> int:
        """Calls still running whose callers gave up."""
        return self._stuck

    async def run(self, func: Callable[..., _R], *args: Any) -> _R:
        """``func(*args)`` on one of the pool's threads, awaited without blocking the loop.

        Cancelling the await stops the wait, not the call: a call already running
        finishes in its thread (and counts as stuck until it does); one still queued is
        dropped.

        Raises:
            BackendError: ``max_stuck`` earlier calls still have not returned.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        job = _Job(func, args, loop, future)
        with self._cond:
            if self._stuck >= self._max_stuck:
                stuck = self._stuck
                raise BackendError(
                    f"{stuck} file operations are still blocked: the filesystem does not answer"
                ) from TimeoutError(f"{stuck} abandoned file operations have not returned")
            self._retire = False
            self._queue.append(job)
            if len(self._queue) > self._idle and self._threads < self._max_threads:
                self._start_thread()
            self._cond.notify()
        try:
            return await future
        except BaseException:
            with self._cond:
                if job.state == _QUEUED:
                    job.state = _DROPPED  # a thread skips it
                elif job.state == _RUNNING and not job.abandoned:
                    job.abandoned = True
                    self._stuck += 1
            raise

    def retire_idle(self) -> None:
        """End the idle threads now (they come back on demand)."""
        with self._cond:
            self._retire = True
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        """Forget the parent's threads and calls: none of them exist in this process.

        A call the parent had in flight is never answered here; its caller's own
        timeout (the manager bounds every backend call) ends the wait.
        """
        self._reset()

    def _start_thread(self) -> None:
        # Called with the lock held.
        self._threads += 1
        self._serial += 1
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{self._serial}", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            self._threads -= 1
            raise

    def _next_job(self) -> _Job[Any] | None:
        """The next job to run, or None when this thread should end. Lock held."""
        while True:
            while not self._queue:
                if self._retire:
                    return None
                self._idle += 1
                try:
                    woke = self._cond.wait(self._idle_timeout)
                finally:
                    self._idle -= 1
                if not woke and not self._queue:
                    return None
            job = self._queue.popleft()
            if job.state == _QUEUED:
                job.state = _RUNNING
                return job

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
                if job is None:
                    self._threads -= 1
                    return
            try:
                ok, value = True, job.func(*job.args)
            except BaseException as exc:  # delivered to the caller, who re-raises it
                ok, value = False, exc
            with self._cond:
                job.state = _DONE
                if job.abandoned:
                    self._stuck -= 1
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, ok, value)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody waits for this any more
            del job, value
