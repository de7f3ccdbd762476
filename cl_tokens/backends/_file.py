"""The file backend: one file per key in a directory, shared by the processes of a machine.

Layout of ``<dir>`` for the key ``cl_tokens:v1:ab12``:

- ``cl_tokens.v1.ab12.json``: the token (see ``_codec``), replaced atomically, mode 0600.
- ``cl_tokens.v1.ab12.lock``: ``acquire_lock`` holds an ``flock`` on it.
- ``cl_tokens.v1.ab12.mutex``: a short ``flock`` that makes compare-and-delete atomic
  against writes from other processes.

Lock and mutex files are never removed: unlinking a lock file that another process has
just opened would let two holders in. POSIX only (``fcntl``).

The directory is created with mode 0700. An existing one is used as it is, but one that
another user owns, or that its group or others may write to, gets a warning (once per
backend): whoever can write there can replace token files or hold the locks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
import string
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio.to_thread

from .._clock import Clock, SystemClock
from .._errors import BackendError, ConfigurationError
from .._token import Token
from ._base import BackendURL, LockHandle, TokenBackend
from ._codec import EncryptionKey, make_codec

if sys.platform != "win32":
    import fcntl

__all__ = ["FileBackend", "file_url_problem"]

logger = logging.getLogger("cl_tokens")

# A token file is a few KiB; reading more would only be reading junk.
_MAX_BYTES = 256 * 1024
# set/delete wait this long for another process's mutex, held for a few syscalls at most.
_MUTEX_WAIT = 5.0
_PLAIN = frozenset(string.ascii_letters + string.digits + "-_")
_MAX_STEM = 200  # file names are limited to 255 bytes; leave room for suffixes

_BACKENDS: weakref.WeakSet[FileBackend] = weakref.WeakSet()


@contextlib.contextmanager
def _wrap_errors(action: str, key: str) -> Iterator[None]:
    """Turn the OS's errors into BackendError, keeping the original as ``__cause__``."""
    try:
        yield
    except OSError as exc:
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


def _directory_problem(info: os.stat_result) -> str | None:
    """Why a directory with ``info`` is unsafe for tokens, or None."""
    if not stat.S_ISDIR(info.st_mode):
        return None  # not a directory: the write that follows fails and says so
    problems = []
    if info.st_uid != os.geteuid():
        problems.append(f"is owned by uid {info.st_uid}, not by this user ({os.geteuid()})")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        problems.append(f"is writable by its group or others (mode {mode:04o})")
    return " and ".join(problems) or None


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read(_MAX_BYTES)
    except FileNotFoundError:
        return None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable, so a crash cannot bring back the old token.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LockAttempt:
    """One non-blocking try at an ``flock``, made in a worker thread.

    A cancelled ``await`` stops waiting for the thread but not the thread itself;
    whichever side finishes last closes a lock nobody will use, so cancelling
    ``acquire_lock`` never leaves the key locked.
    """

    def __init__(self, path: Path, prepare: Callable[[], None]) -> None:
        self.path = path
        self.fd: int | None = None
        self._prepare = prepare
        self._abandoned = False
        self._guard = threading.Lock()

    def run(self) -> None:
        self._prepare()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # another holder has it
            return
        except BaseException:
            os.close(fd)
            raise
        with self._guard:
            if not self._abandoned:
                self.fd = fd
                return
        os.close(fd)

    def abandon(self) -> None:
        with self._guard:
            self._abandoned = True
            fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


_R = TypeVar("_R")
_MAX_STUCK = 4  # file operations still running in threads whose callers gave up


class _Threads:
    """Runs file operations in worker threads, and stops starting new ones while
    earlier ones are stuck.

    A caller that times out (the manager bounds every backend call) stops waiting, but
    its thread stays blocked on a hung filesystem; starting a new thread for each retry
    would pile them up without bound, in the pool the rest of the application (a
    Starlette sync endpoint, say) shares. After ``_MAX_STUCK`` abandoned operations are
    still blocked, calls fail at once until one returns.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._stuck = 0

    async def run(self, func: Callable[..., _R], *args: Any) -> _R:
        with self._guard:
            if self._stuck >= _MAX_STUCK:
                raise BackendError(
                    f"{self._stuck} file operations are still blocked: the filesystem "
                    "does not answer"
                )
        state = {"started": False, "finished": False, "abandoned": False}

        def tracked() -> _R:
            with self._guard:
                if state["abandoned"]:
                    raise RuntimeError("abandoned before it started")
                state["started"] = True
            try:
                return func(*args)
            finally:
                with self._guard:
                    state["finished"] = True
                    if state["abandoned"]:
                        self._stuck -= 1

        try:
            return await anyio.to_thread.run_sync(tracked, abandon_on_cancel=True)
        except BaseException:
            with self._guard:
                # The caller gave up (a timeout, a cancellation) on an operation still
                # running in its thread: stuck until it returns. One that had not
                # started yet never will.
                if not state["finished"]:
                    state["abandoned"] = True
                    if state["started"]:
                        self._stuck += 1
            raise


class FileBackend(TokenBackend):
    """Tokens in files of a local directory, shared by every process of the machine.

    Writes are atomic (temporary file, fsync, rename), so readers see the old token or
    the new one, never half of one. Unreadable, truncated or expired files are misses.
    The lock is an ``flock``: the OS drops it when its holder exits or is killed, so
    ``lease`` is ignored (it only matters as the wait bound of ``lock``). ``flock``
    belongs to one open file, so two ``acquire_lock`` calls in one process exclude each
    other just as two processes do. Do not use it on NFS: ``flock`` there is unreliable.

    Args:
        directory: where the files go (a relative path is taken from the current
            directory now); created with mode 0700, parents included, on first write.
        encryption_key: a Fernet key, or a list of them (the first encrypts), to store
            tokens encrypted; needs ``pip install 'cl-tokens[encryption]'``.
        clock: where "now" comes from for expiry (default: the system clock).

    Raises:
        ConfigurationError: on Windows (no ``fcntl``), or a bad ``encryption_key``.
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
        self._clock: Clock = clock or SystemClock()
        self._held: dict[str, int] = {}  # lock owner -> the fd holding its flock
        self._dir_checked = False  # the directory's owner and mode, checked once
        self._dir_guard = threading.Lock()  # _ensure_dir runs in worker threads
        self._threads = _Threads()
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

    def _path(self, key: str, suffix: str) -> Path:
        return self._dir / (_stem(key) + suffix)

    def _ensure_dir(self) -> None:
        try:
            os.makedirs(self._dir, mode=0o700)
        except FileExistsError:
            # Not created here: someone else chose its owner and mode; check them once.
            with self._dir_guard:
                check, self._dir_checked = not self._dir_checked, True
            if check:
                self._check_dir()
        else:
            self._dir_checked = True  # made by this backend, 0700

    def _check_dir(self) -> None:
        try:
            info = os.stat(self._dir)
        except OSError:
            return  # the write that follows reports it
        problem = _directory_problem(info)
        if problem:
            logger.warning(
                "file backend directory %s %s: another local user could replace the "
                "token files or hold the locks; use a directory only this user can "
                "write to (e.g. chmod 700)",
                self._dir,
                problem,
            )

    @contextlib.contextmanager
    def _mutex(self, key: str) -> Iterator[None]:
        fd = os.open(self._path(key, ".mutex"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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

    async def get(self, key: str) -> Token | None:
        with _wrap_errors("read", key):
            data = await self._threads.run(_read, self._path(key, ".json"))
        if not data:
            return None
        token = self._codec.decode(data)
        if token is None or token.expires_at <= self._clock.time():
            return None
        return token

    async def set(self, key: str, token: Token) -> None:
        data = self._codec.encode(token)
        with _wrap_errors("write", key):
            await self._threads.run(self._write, key, data)

    def _write(self, key: str, data: bytes) -> None:
        self._ensure_dir()
        path = self._path(key, ".json")
        # mkstemp makes the file 0600; the same directory keeps the rename atomic.
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            with self._mutex(key):
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self._dir)

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        with _wrap_errors("delete", key):
            return await self._threads.run(self._delete, key, access_token)

    def _delete(self, key: str, access_token: str | None) -> bool:
        path = self._path(key, ".json")
        if access_token is None:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            return True
        if not self._dir.is_dir():
            return False
        # Under the mutex no other process can replace the file between the check and
        # the unlink, so a token written meanwhile is never deleted by mistake.
        with self._mutex(key):
            data = _read(path)
            token = self._codec.decode(data) if data else None
            if token is None or token.access_token != access_token:
                return False
            path.unlink()
            return True

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        # ``lease`` is unused: the OS releases an flock when its holder dies.
        attempt = _LockAttempt(self._path(key, ".lock"), self._ensure_dir)
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

    async def aclose(self) -> None:
        self._close_held()

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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
