"""The file backend: one file per key in a directory, shared by the processes of a machine.

Layout of ``<dir>`` for the key ``cl_tokens:v2:ab12``:

- ``cl_tokens.v2.ab12.json``: the token (see ``_codec``), replaced atomically, mode 0600.
- ``cl_tokens.v2.ab12.backoff``: the wall-clock time before which no token request may
  be sent for the key (``set_backoff``), replaced atomically, mode 0600.
- ``cl_tokens.v2.ab12.lock``: ``acquire_lock`` holds an ``flock`` on it.
- ``cl_tokens.v2.ab12.mutex``: a short ``flock`` that makes compare-and-delete atomic
  against writes from other processes.

Lock and mutex files are never removed: unlinking a lock file that another process has
just opened would let two holders in. POSIX only (``fcntl``).

Who can touch the files is checked on every operation (see ``_file_safety``): the
directory must be owned by this user or root and writable by nobody else, or the
backend refuses it (``ConfigurationError``, also a ``BackendError`` when an operation
finds it); token and back-off files that another user owns, or that others may read,
are ignored with a warning; symbolic links are never followed. File calls run on the
backend's own daemon threads (see ``_daemon_pool``).

The cold path takes two thread hops. ``get_or_lock`` reads the token and, on a miss,
takes the lock, reads the token again under it and reads the back-off file (which the
``get_backoff`` that follows within a second gets from memory), all in one;
``set_and_release`` writes the token (temporary file, rename) and releases the lock in
one. Waiters are woken by the write or the release through inotify (``_file_watch``),
and poll where it is missing.

What a crash can lose: token writes are not fsynced. A process that dies loses
nothing (the page cache is the kernel's); a machine that loses power may come back
with the old token file, no file, or a new one that is empty or partly written. The
rename is atomic, and a partial or zero-filled file does not decode (nor pass the
manager's MAC), so it reads as a miss: at worst one extra token request, never a wrong
token. The old token is a real token of the same credential; if it was revoked, the
API's rejection makes the manager fetch again. Locks need no durability: they live in
the kernel and die with their holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import secrets
import string
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .._clock import Clock, SystemClock
from .._errors import BackendError, ConfigurationError
from .._token import Token
from ._base import BackendURL, LockHandle, TokenBackend
from ._codec import EncryptionKey, make_codec
from ._daemon_pool import DaemonPool
from ._file_locks import LockAttempt, LockHandoff, unlock
from ._file_safety import (
    check_directory_path,
    open_directory,
    open_in,
    read_regular,
    write_atomic,
)
from ._file_watch import DirWatcher, NoPush

if sys.platform != "win32":
    import fcntl

__all__ = ["FileBackend", "file_url_problem"]

logger = logging.getLogger("cl_tokens")

# A token file is a few KiB; reading more would only be reading junk.
_MAX_BYTES = 256 * 1024
# A back-off file holds one number.
_MAX_BACKOFF_BYTES = 64
# A back-off further ahead than this is junk (a clock gone wrong, a planted value): no
# real Retry-After asks a fleet to stop for a day.
_MAX_BACKOFF_AHEAD = 86_400.0
# set/delete wait this long for another process's mutex, held for a few syscalls at most.
_MUTEX_WAIT = 5.0
_PLAIN = frozenset(string.ascii_letters + string.digits + "-_")
_MAX_STEM = 200  # file names are limited to 255 bytes; leave room for suffixes
# Abandoned file calls still running at which new ones fail at once (see DaemonPool).
_MAX_STUCK = 4
_MAX_THREADS = 8
_MAX_WARNED = 1024  # ignored files remembered, so each is warned about once
# A back-off that get_or_lock read with the lock answers the get_backoff that follows it
# (the manager's next step) for this long: one thread hop saved on the cold path.
_BACKOFF_MEMO = 1.0
_MAX_MEMO = 1024

_BACKENDS: weakref.WeakSet[FileBackend] = weakref.WeakSet()


@contextlib.contextmanager
def _wrap_errors(action: str, key: str) -> Iterator[None]:
    """Turn every failure into BackendError, keeping the original as ``__cause__``."""
    try:
        yield
    except BackendError:
        raise  # already says what failed (an unsafe directory, stuck threads)
    except Exception as exc:
        raise BackendError(f"file backend could not {action} {key}: {exc}") from exc


def _stem(key: str) -> str:
    """The file name (without suffix) for ``key``: readable, and distinct per key.

    ``:`` becomes ``.``; every other character outside ``[A-Za-z0-9_-]`` is
    percent-encoded, so no two keys share a name and no key escapes the directory.
    """
    out = []
    for char in key:
        if char in _PLAIN:
            out.append(char)
        elif char == ":":
            out.append(".")
        else:
            out.append("".join(f"%{byte:02X}" for byte in char.encode()))
    stem = "".join(out)
    if len(stem) > _MAX_STEM:
        # "=" never occurs in an encoded name, so hashed names cannot meet readable ones.
        stem = "=" + hashlib.sha256(key.encode()).hexdigest()
    return stem


def file_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable ``file://`` backend URL (``file:///absolute/dir``), or
    None. ``Settings`` reports it under the backend's variable; ``FileBackend.from_url``
    raises it. The reason never repeats the URL.

    Args:
        url: a URL whose scheme is ``file``.
    """
    try:
        parts = urlsplit(url)
        host, username, password = parts.hostname, parts.username, parts.password
    except ValueError:
        return "is not a valid URL; a file:// URL looks like file:///var/cache/cl-tokens"
    if host not in (None, "", "localhost") or username or password:
        return (
            "a file:// URL takes an absolute path after three slashes, "
            "such as file:///var/cache/cl-tokens"
        )
    path = unquote(parts.path)
    if not path.startswith("/") or not path.strip("/"):
        return "a file:// URL needs an absolute directory, such as file:///var/cache/cl-tokens"
    if parts.query:
        # Secrets (the encryption key) must not travel in URLs, which get logged.
        return (
            "a file:// URL takes no query options; pass encryption_key= and the "
            "other options as arguments"
        )
    return None


def _parse_backoff(data: bytes) -> float | None:
    """The ``retry_at`` in a back-off file, or None for junk."""
    try:
        value = float(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


class FileBackend(TokenBackend):
    """Tokens in files of a local directory, shared by every process of the machine.

    Writes are atomic (temporary file, rename), so readers see the old token or the
    new one, never half of one; they are not fsynced (a power loss costs at most one
    extra fetch, see the module docstring). Unreadable, truncated or expired files are misses.
    The lock is an ``flock``: the OS drops it when its holder exits or is killed, so
    ``lease`` is ignored (it only matters as the wait bound of ``lock``). ``flock``
    belongs to one open file, so two ``acquire_lock`` calls in one process exclude each
    other just as two processes do. Do not use it on NFS: ``flock`` there is unreliable.

    The directory must be owned by this user (or root) and writable by nobody else;
    that is checked here and again on every operation. Files in it that another user
    owns, that others may read, or that are symbolic links are never trusted.

    Args:
        directory: where the files go (a relative path is taken from the current
            directory now); created with mode 0700, parents included, on first write.
            It must not itself be a symbolic link.
        encryption_key: a Fernet key, or a list of them (the first encrypts), to store
            tokens encrypted; needs ``pip install 'cl-tokens[encryption]'``.
        clock: where "now" comes from for expiry (default: the system clock).

    Raises:
        ConfigurationError: on Windows (no ``fcntl``), a bad ``encryption_key``, or an
            existing directory that another user owns, that its group or others may
            write to, or that is a symbolic link (the message says how to fix it).
    """

    schemes = ("file",)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        encryption_key: EncryptionKey | None = None,
        clock: Clock | None = None,
    ) -> None:
        if sys.platform == "win32":
            raise ConfigurationError("the file backend needs POSIX file locks; use redis://")
        self._dir = Path(directory).expanduser().absolute()
        self._codec = make_codec(encryption_key)
        check_directory_path(self._dir)
        self._clock: Clock = clock or SystemClock()
        self._held: dict[str, int] = {}  # lock owner -> the fd holding its flock
        # key -> (the back-off file read by get_or_lock with the lock, when)
        self._backoff_memo: dict[str, tuple[bytes | None, float]] = {}
        self._threads = DaemonPool("cl_tokens-file", max_threads=_MAX_THREADS, max_stuck=_MAX_STUCK)
        self._warned: set[tuple[str, int, int]] = set()
        self._warn_guard = threading.Lock()
        self._watcher = DirWatcher(self._dir, self._peek, "cl_tokens-file-watch")
        _BACKENDS.add(self)

    @classmethod
    def from_url(cls, url: BackendURL, **options: Any) -> FileBackend:
        """``file:///absolute/dir``; ``encryption_key`` and ``clock`` come as options.

        Args:
            url: the parsed URL.
            **options: keyword arguments of the constructor.
        """
        problem = file_url_problem(url.raw)
        if problem:
            raise ConfigurationError(problem)
        return cls(url.path, **options)

    def __repr__(self) -> str:
        return f"FileBackend(directory={str(self._dir)!r}, encrypted={self._codec.encrypted})"

    @property
    def directory(self) -> Path:
        """The directory holding the files."""
        return self._dir

    # -- in worker threads ---------------------------------------------------------------

    @contextlib.contextmanager
    def _opened_dir(self, *, create: bool) -> Iterator[int | None]:
        """The checked directory's descriptor for one operation (None: it does not exist)."""
        dfd = open_directory(self._dir, create=create)
        try:
            yield dfd
        finally:
            if dfd is not None:
                os.close(dfd)

    def _ignored(self, name: str, info: os.stat_result | None, why: str) -> None:
        """Warn, once per file, that a file was not trusted and so read as a miss."""
        ident = (name, info.st_dev, info.st_ino) if info is not None else (name, -1, -1)
        with self._warn_guard:
            if ident in self._warned:
                return
            if len(self._warned) >= _MAX_WARNED:
                self._warned.clear()
            self._warned.add(ident)
        logger.warning(
            "file backend ignored %s in %s: it %s, so another user may have planted it; "
            "it counts as a miss and the next write replaces it",
            name,
            self._dir,
            why,
        )

    def _read(self, key: str, suffix: str, limit: int) -> bytes | None:
        with self._opened_dir(create=False) as dfd:
            if dfd is None:
                return None
            return read_regular(dfd, _stem(key) + suffix, limit, self._ignored)

    def _read_backoff(self, key: str) -> bytes | None:
        with self._opened_dir(create=False) as dfd:
            return None if dfd is None else self._backoff_in(dfd, key)

    def _write(self, key: str, suffix: str, data: bytes, durable: bool) -> None:
        with self._opened_dir(create=True) as dfd:
            assert dfd is not None  # noqa: S101 - create=True always opens it (for mypy)
            guard = (lambda: self._mutex(dfd, key)) if suffix == ".json" else None
            write_atomic(dfd, _stem(key) + suffix, data, durable=durable, guard=guard)

    @contextlib.contextmanager
    def _mutex(self, dfd: int, key: str) -> Iterator[None]:
        fd = open_in(dfd, _stem(key) + ".mutex", os.O_RDWR | os.O_CREAT)
        try:
            deadline = time.monotonic() + _MUTEX_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"mutex busy for {_MUTEX_WAIT:g} s") from None
                    time.sleep(0.001)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _delete(self, key: str, access_token: str | None) -> bool:
        name = _stem(key) + ".json"
        with self._opened_dir(create=False) as dfd:
            if dfd is None:
                return False
            if access_token is None:
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    return False
                return True
            # Under the mutex no other process can replace the file between the check
            # and the unlink, so a token written meanwhile is never deleted by mistake.
            with self._mutex(dfd, key):
                data = read_regular(dfd, name, _MAX_BYTES, self._ignored)
                token = self._codec.decode(data) if data else None
                if token is None or token.access_token != access_token:
                    return False
                os.unlink(name, dir_fd=dfd)
                return True

    def _take_lock(self, key: str) -> int | None:
        with self._opened_dir(create=True) as dfd:
            assert dfd is not None  # noqa: S101 - create=True always opens it (for mypy)
            return self._lock_in(dfd, key)

    def _lock_in(self, dfd: int, key: str) -> int | None:
        """The descriptor holding the flock on ``key``, or None if another holder has it.

        Opened read-write: its close (an unlock, or the kernel's for a killed holder) is
        the ``IN_CLOSE_WRITE`` event that wakes the waiters (see ``_file_watch``).
        """
        fd = open_in(dfd, _stem(key) + ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # another holder has it
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _token_in(self, dfd: int, key: str, refuse: str | None) -> Token | None:
        data = read_regular(dfd, _stem(key) + ".json", _MAX_BYTES, self._ignored)
        # A torn or partly written file (a crash without fsync) does not decode: a miss.
        token = self._codec.decode(data) if data else None
        if token is None or token.keep_until <= self._clock.time():
            return None
        return None if token.access_token == refuse else token

    def _get_or_lock(
        self, key: str, refuse: str | None, backoff: list[bytes | None]
    ) -> Token | int | None:
        """The whole of ``get_or_lock`` in one thread hop; with the lock taken, the
        back-off file is read too (into ``backoff``) for the ``get_backoff`` that
        follows."""
        with self._opened_dir(create=True) as dfd:
            assert dfd is not None  # noqa: S101 - create=True always opens it (for mypy)
            token = self._token_in(dfd, key, refuse)
            if token is not None:
                return token
            fd = self._lock_in(dfd, key)
            if fd is None:
                return None
            try:
                # A holder may have written and released between the read and the lock:
                # read again rather than fetch a token that is already there.
                token = self._token_in(dfd, key, refuse)
            except BaseException:
                unlock(fd)
                raise
            if token is None:
                try:
                    backoff.append(self._backoff_in(dfd, key))
                except BaseException:
                    unlock(fd)
                    raise
                return fd
            unlock(fd)
            return token

    def _backoff_in(self, dfd: int, key: str) -> bytes | None:
        # One byte more than allowed: a longer file is junk, not its first bytes.
        return read_regular(dfd, _stem(key) + ".backoff", _MAX_BACKOFF_BYTES + 1, self._ignored)

    def _write_and_unlock(self, key: str, data: bytes, handoff: LockHandoff) -> None:
        """The whole of ``set_and_release`` in one thread hop."""
        fd = handoff.take()
        if fd is None:
            return  # the caller was cancelled first and released the lock itself
        try:
            self._write(key, ".json", data, False)
        finally:
            unlock(fd)

    def _peek(self, key: str) -> tuple[Token | None, bool]:
        """The stored token and whether the lock on ``key`` is held, for waiters.

        The probe is a shared flock on a read-only descriptor: its close is
        ``IN_CLOSE_NOWRITE``, which wakes nobody, and two probes never exclude each other.
        """
        with self._opened_dir(create=False) as dfd:
            if dfd is None:
                return None, False
            # The lock first: once it is seen free, whatever its holder wrote before
            # releasing it is there to read (the other order misses such a token).
            held = self._lock_held(dfd, key)
            return self._token_in(dfd, key, None), held

    def _lock_held(self, dfd: int, key: str) -> bool:
        try:
            fd = open_in(dfd, _stem(key) + ".lock", os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- the backend API -----------------------------------------------------------------

    async def get(self, key: str) -> Token | None:
        with _wrap_errors("read", key):
            data = await self._threads.run(self._read, key, ".json", _MAX_BYTES)
            if not data:
                return None
            token = self._codec.decode(data)
        if token is None or token.keep_until <= self._clock.time():
            return None
        return token

    async def get_or_lock(
        self, key: str, *, lease: float, refuse: str | None = None
    ) -> Token | LockHandle | None:
        """Read the token and, if there is none (or only ``refuse``), take the lock, in
        one thread hop; the token is read again under a newly taken lock."""
        backoff: list[bytes | None] = []
        attempt = LockAttempt(lambda: self._get_or_lock(key, refuse, backoff))
        try:
            with _wrap_errors("read or lock", key):
                await self._threads.run(attempt.run)
        except BaseException:
            attempt.abandon()
            raise
        result, attempt.result = attempt.result, None
        if not isinstance(result, int):
            return result
        owner = secrets.token_hex(16)
        self._held[owner] = result
        if len(self._backoff_memo) > _MAX_MEMO:
            self._backoff_memo.clear()
        self._backoff_memo[key] = (backoff[0] if backoff else None, time.monotonic())
        return LockHandle(key, owner)

    async def set_and_release(self, key: str, token: Token, handle: LockHandle) -> None:
        """Write ``token`` and release ``handle`` in one thread hop, without fsync (see
        the module docstring for what a crash can lose). The lock is released even if
        the write fails or the caller is cancelled."""
        fd = self._held.pop(handle.owner, None)
        if fd is None:
            # Not a lock of this backend (or already released): write only.
            await self.set(key, token)
            return
        handoff = LockHandoff(fd)
        try:
            with _wrap_errors("write", key):
                data = self._codec.encode(token)
                await self._threads.run(self._write_and_unlock, key, data, handoff)
        finally:
            mine = handoff.take()  # the thread never started: release here, inline
            if mine is not None:
                with _wrap_errors("unlock", key):
                    unlock(mine)

    async def wait_for(
        self, key: str, *, timeout: float, refuse: str | None = None, poll: float = 0.05
    ) -> Token | None:
        """A token other than ``refuse`` as soon as it is written; None when the lock is
        free without one (its holder failed, or was killed) or after ``timeout``.

        Woken by inotify on Linux (see ``_file_watch``); elsewhere, or if the
        directory cannot be watched, polls every ``poll`` seconds on the backend's
        threads. Never blocks the loop; cancellable.
        """
        with _wrap_errors("wait for", key):
            result = await self._watcher.wait(key, _stem(key), timeout, refuse)
        if not isinstance(result, NoPush):
            return result
        deadline = time.monotonic() + timeout
        while True:
            with _wrap_errors("wait for", key):
                token, held = await self._threads.run(self._peek, key)
            if token is not None and token.access_token != refuse:
                return token
            left = deadline - time.monotonic()
            if not held or left <= 0:
                return None
            await asyncio.sleep(min(left, poll * random.uniform(0.5, 1.5)))  # noqa: S311

    async def set(self, key: str, token: Token) -> None:
        with _wrap_errors("write", key):
            data = self._codec.encode(token)
            await self._threads.run(self._write, key, ".json", data, False)

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        with _wrap_errors("delete", key):
            return await self._threads.run(self._delete, key, access_token)

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        # ``lease`` is unused: the OS releases an flock when its holder dies.
        attempt = LockAttempt(lambda: self._take_lock(key))
        try:
            with _wrap_errors("lock", key):
                await self._threads.run(attempt.run)
        except BaseException:
            attempt.abandon()
            raise
        if attempt.fd is None:
            return None
        owner = secrets.token_hex(16)
        self._held[owner] = attempt.fd
        return LockHandle(key, owner)

    async def release_lock(self, handle: LockHandle) -> None:
        fd = self._held.pop(handle.owner, None)
        if fd is None:
            return  # not taken by this backend, or already released
        # Inline, not in a thread: two syscalls that never block, and a release must
        # complete even while the task is being cancelled.
        with _wrap_errors("unlock", handle.key):
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    async def get_backoff(self, key: str) -> float | None:
        """The ``retry_at`` in ``<stem>.backoff``; None when absent, expired, junk
        (not a finite number, or more than a day ahead) or not trusted."""
        memo = self._backoff_memo.pop(key, None)
        if memo is not None and time.monotonic() - memo[1] < _BACKOFF_MEMO:
            data = memo[0]  # read with the lock an instant ago: no second hop
        else:
            with _wrap_errors("read the back-off of", key):
                data = await self._threads.run(self._read_backoff, key)
        too_long = data is not None and len(data) > _MAX_BACKOFF_BYTES
        retry_at = _parse_backoff(data) if data and not too_long else None
        if retry_at is None:
            return None
        now = self._clock.time()
        if retry_at <= now or retry_at > now + _MAX_BACKOFF_AHEAD:
            return None
        return retry_at

    async def set_backoff(self, key: str, retry_at: float) -> None:
        """Write ``retry_at`` to ``<stem>.backoff`` (atomically, mode 0600).

        Not fsynced: after a crash, a lost back-off costs one request, never a token.
        """
        self._backoff_memo.pop(key, None)
        with _wrap_errors("write the back-off of", key):
            if not math.isfinite(retry_at):
                raise ValueError("retry_at must be a finite number")
            data = repr(float(retry_at)).encode() + b"\n"
            await self._threads.run(self._write, key, ".backoff", data, False)

    async def aclose(self) -> None:
        self._close_held()
        self._threads.retire_idle()
        self._watcher.stop()

    def _close_held(self) -> None:
        # Closing (not LOCK_UN) drops the locks; after a fork it must be only a close,
        # as the child's copies share the parent's locks and LOCK_UN would free those.
        held, self._held = self._held, {}
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._close_held()
        backend._threads.after_fork_in_child()
        backend._watcher.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
