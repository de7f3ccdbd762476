"""Push wake-ups for the file backend's ``wait_for``: one inotify watch on the directory.

A process waiting for another's fetch is woken by the kernel, not by a timer:

- the writer's ``os.replace`` of ``<stem>.json`` is an ``IN_MOVED_TO`` event;
- the holder's release of ``<stem>.lock`` is an ``IN_CLOSE_WRITE`` event: the holder
  opened it read-write, and the kernel closes it for a holder that is killed, so a
  ``kill -9`` wakes the waiters too.

Each backend has one inotify descriptor (via ``ctypes``, Linux only) and one daemon
thread that reads it; every waiter of every key of that backend shares them. On an
event for a key, that thread reads the token and probes the lock (``_peek``) once, and
hands the outcome to the key's waiters through ``call_soon_threadsafe``: the event loop
is never blocked, and a wake-up costs one thread wake and one loop wake.

The probe opens the lock file read-only and takes a shared ``flock`` without waiting:
closing a read-only descriptor is ``IN_CLOSE_NOWRITE``, which is not watched, so the
waiters' probes never wake each other. A shared probe that meets a ``get_or_lock``
of another process makes it wait; its own ``wait_for`` then finds the lock free at
once and it takes the lock again.

Lost wake-ups: a waiter is registered (and the watch armed) before its first check, so a
write between a caller's ``get_or_lock`` and its ``wait_for`` is seen by that check. A
killed holder's close event comes a moment before the kernel drops its ``flock``; a key
whose event found the lock still held is checked again 20 ms later, and every waited-for
key once a second whatever happens (a queue overflow, a directory replaced).

After a fork the child closes its copies of the descriptors (they share the parent's
inotify instance, whose events must stay the parent's) and starts afresh when it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .._token import Token

if TYPE_CHECKING:
    import ctypes

__all__ = ["NO_PUSH", "DirWatcher", "NoPush", "Peek"]

logger = logging.getLogger("cl_tokens")

#: (the stored token, expiry already checked, or None; whether the lock is held)
Peek = tuple[Token | None, bool]

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000
_WATCHED = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF
_EVENT = struct.Struct("iIII")

_SOON = 0.02  # a killed holder's lock is dropped just after its close event
_RECHECK = 1.0  # the safety net under the push
_IDLE = 10.0  # the thread ends after this long without waiters


class NoPush:
    """``DirWatcher.wait`` cannot watch here: the caller polls instead."""


NO_PUSH = NoPush()


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only for a wait: its import costs time most processes never need

    try:
        # The process's own symbols, libc's among them: find_library would run ldconfig.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


_libc: list[ctypes.CDLL | None] = []  # empty: not looked up yet


def _inotify() -> ctypes.CDLL | None:
    if not _libc:
        _libc.append(_load_libc())
    return _libc[0]


class _Waiter:
    __slots__ = ("future", "loop", "refuse")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Token | None],
        refuse: str | None,
    ) -> None:
        self.loop = loop
        self.future = future
        self.refuse = refuse


def _settle(future: asyncio.Future[Token | None], value: Token | None) -> None:
    if not future.done():
        future.set_result(value)


class DirWatcher:
    """Wakes the waiters of a directory's keys when their token is written or their
    lock released.

    Args:
        directory: the backend's directory.
        peek: ``peek(key)`` reads the token and probes the lock; called on the
            watcher's thread.
        name: the thread's name.
    """

    def __init__(self, directory: Path, peek: Callable[[str], Peek], name: str) -> None:
        self._dir = directory
        self._peek = peek
        self._name = name
        self._guard = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._fd = -1
        self._wake_r = self._wake_w = -1
        self._running = False
        self._stop = False
        self._waiters: dict[str, list[_Waiter]] = {}  # key -> its waiters
        self._names: dict[str, str] = {}  # watched file name -> key
        self._due: set[str] = set()  # keys to check as soon as the thread wakes

    async def wait(
        self, key: str, stem: str, timeout: float, refuse: str | None
    ) -> Token | NoPush | None:
        """A token for ``key`` other than ``refuse``; None when the lock is free with no
        such token (its holder left without writing) or after ``timeout`` seconds;
        ``NO_PUSH`` when nothing can be watched here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Token | None] = loop.create_future()
        waiter = _Waiter(loop, future, refuse)
        if not self._register(key, stem, waiter):
            return NO_PUSH
        timer = loop.call_later(max(0.0, timeout), _settle, future, None)
        try:
            return await future
        finally:
            timer.cancel()
            self._unregister(key, stem, waiter)

    def stop(self) -> None:
        """End the thread and close the descriptors; pending waits end with None."""
        with self._guard:
            if not self._running:
                return
            self._stop = True
            self._poke()

    def after_fork_in_child(self) -> None:
        """Drop the parent's thread, waiters and descriptors (its inotify instance)."""
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._guard = threading.Lock()
        self._reset()

    # -- on the caller's side ------------------------------------------------------------

    def _register(self, key: str, stem: str, waiter: _Waiter) -> bool:
        with self._guard:
            if not self._running and not self._start():
                return False
            self._waiters.setdefault(key, []).append(waiter)
            self._names[stem + ".json"] = key
            self._names[stem + ".lock"] = key
            self._due.add(key)
            self._poke()
        return True

    def _unregister(self, key: str, stem: str, waiter: _Waiter) -> None:
        with self._guard:
            waiters = self._waiters.get(key)
            if waiters is None:
                return
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                del self._waiters[key]
                self._names.pop(stem + ".json", None)
                self._names.pop(stem + ".lock", None)

    def _start(self) -> bool:
        """Open the descriptors and start the thread (lock held); False if it cannot."""
        libc = _inotify()
        if libc is None:
            return False
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            import ctypes

            error = errno.errorcode.get(ctypes.get_errno())
            logger.debug("inotify_init1 failed (%s): polling", error)
            return False
        mask = _WATCHED | _IN_ONLYDIR | _IN_DONT_FOLLOW
        if libc.inotify_add_watch(fd, os.fsencode(self._dir), mask) < 0:
            # The directory does not exist yet (no holder made it) or cannot be watched.
            os.close(fd)
            return False
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._fd, self._wake_r, self._wake_w = fd, wake_r, wake_w
        self._running, self._stop = True, False
        try:
            thread.start()
        except BaseException:
            self._close_fds()
            raise
        return True

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the thread anyway
            os.write(self._wake_w, b"!")

    # -- on the watcher's thread ---------------------------------------------------------

    def _close_fds(self) -> None:
        # Lock held.
        for fd in (self._fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
        self._running = False

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            # Never seen; if it happens, the waiters must not wait out their timeouts
            # on a thread that is gone, and the next wait must start a new one.
            logger.debug("file backend: the watcher's thread failed: %r", exc)
            with self._guard:
                ended = list(self._waiters.values())
                self._waiters.clear()
                self._close_fds()
            for waiters in ended:
                for waiter in waiters:
                    self._deliver(waiter, None)

    def _loop(self) -> None:
        poller = select.poll()
        with self._guard:
            fd, wake_r = self._fd, self._wake_r
        poller.register(fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        soon: set[str] = set()
        idle_since = time.monotonic()
        while True:
            with self._guard:
                if self._stop or (not self._waiters and time.monotonic() - idle_since > _IDLE):
                    ended = list(self._waiters.values())
                    self._waiters.clear()
                    self._close_fds()
                    break
                if self._waiters:
                    idle_since = time.monotonic()
            wait = _SOON if soon else (_RECHECK if self._waiters else _IDLE)
            ready = poller.poll(wait * 1000)
            keys = self._drain(ready, fd, wake_r)
            from_events = set(keys)
            if not ready:
                keys = soon or set(self._waiters)
                soon = set()
            with self._guard:
                keys |= self._due
                self._due.clear()
                keys &= self._waiters.keys()
            for key in keys:
                if self._check(key) and key in from_events:
                    soon.add(key)
        for waiters in ended:
            for waiter in waiters:
                self._deliver(waiter, None)

    def _drain(self, ready: list[tuple[int, int]], fd: int, wake_r: int) -> set[str]:
        """The keys named by the pending events (every key on an overflow)."""
        if not ready:
            return set()
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 512):
                pass
        keys: set[str] = set()
        everything = False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + length].rstrip(b"\0").decode("utf-8", "replace")
                offset += length
                if mask & (_IN_Q_OVERFLOW | _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    everything = True
                    continue
                with self._guard:
                    key = self._names.get(name)
                if key is not None:
                    keys.add(key)
        if everything:
            with self._guard:
                keys |= self._waiters.keys()
        return keys

    def _check(self, key: str) -> bool:
        """Peek at ``key`` and settle the waiters it satisfies; True if the lock is
        held and some waiter still waits."""
        try:
            token, held = self._peek(key)
        except Exception as exc:  # a fault is the caller's to see through its own get_or_lock
            logger.debug("file backend: checking a waited-for key failed: %s", type(exc).__name__)
            return False
        done: list[tuple[_Waiter, Token | None]] = []
        with self._guard:
            waiters = self._waiters.get(key, [])
            for waiter in list(waiters):
                if token is not None and token.access_token != waiter.refuse:
                    done.append((waiter, token))
                elif not held:
                    done.append((waiter, None))
                else:
                    continue
                waiters.remove(waiter)
            still = bool(waiters)
        for waiter, value in done:
            self._deliver(waiter, value)
        return held and still

    @staticmethod
    def _deliver(waiter: _Waiter, value: Token | None) -> None:
        with contextlib.suppress(RuntimeError):  # the waiter's loop is closed
            waiter.loop.call_soon_threadsafe(_settle, waiter.future, value)
