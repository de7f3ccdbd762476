"""The file backend's flocks across a thread hop: a cancelled caller never leaves one held."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

from .._token import Token

if sys.platform != "win32":
    import fcntl

__all__ = ["LockAttempt", "LockHandoff", "unlock"]


class LockAttempt:
    """One non-blocking try at an ``flock`` (after reading the token, for
    ``get_or_lock``), made in a worker thread.

    A cancelled ``await`` stops waiting for the thread but not the thread itself;
    whichever side finishes last closes a lock nobody will use, so cancelling
    ``acquire_lock`` never leaves the key locked.
    """

    def __init__(self, take: Callable[[], Token | int | None]) -> None:
        self.result: Token | int | None = None
        self._take = take
        self._abandoned = False
        self._guard = threading.Lock()

    @property
    def fd(self) -> int | None:
        return self.result if isinstance(self.result, int) else None

    def run(self) -> None:
        result = self._take()
        with self._guard:
            if not self._abandoned:
                self.result = result
                return
        if isinstance(result, int):
            os.close(result)

    def abandon(self) -> None:
        with self._guard:
            self._abandoned = True
            result, self.result = self.result, None
        if isinstance(result, int):
            os.close(result)


class LockHandoff:
    """A held lock's descriptor, released by exactly one side: the thread that writes
    the token and then releases it, or a caller cancelled before that thread began."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._guard = threading.Lock()

    def take(self) -> int | None:
        with self._guard:
            fd, self._fd = self._fd, None
        return fd


def unlock(fd: int) -> None:
    """Release an flock and close its descriptor; the close is what wakes the waiters
    of other processes (``IN_CLOSE_WRITE``), so it comes after the unlock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
