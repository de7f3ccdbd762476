"""Opening files in the file backend's directory so that nobody else chooses what is read.

Threat: another local user (or a process that runs as one) who could write to the
directory, or who made it first under ``/tmp``, could plant a token file, replace one,
hold the locks, or plant a symbolic link so that a root process creates or truncates
a file where that user chooses. Hence:

- The directory must be owned by this user or by root, and not writable by its group or
  others; anything else is refused with ``UnsafeDirectoryError``. It is checked through
  the descriptor every operation opens it with, so a directory swapped in after the
  check is never used.
- Every name is opened relative to that descriptor with ``O_NOFOLLOW`` and
  ``O_CLOEXEC``: a symbolic link is never followed, and no descriptor leaks into a
  child process.
- A token or back-off file that is not a regular file owned by this user with a mode
  of at most 0600 is not read (the caller treats it as a miss and warns).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from .._errors import BackendError, ConfigurationError

__all__ = [
    "UnsafeDirectoryError",
    "check_directory_path",
    "file_problem",
    "open_directory",
    "open_in",
    "read_regular",
    "write_atomic",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
#: Added to every ``os.open`` of the backend.
SAFE = _NOFOLLOW | _CLOEXEC


class UnsafeDirectoryError(BackendError, ConfigurationError):
    """The directory could be written by someone else than this user (or root).

    A ``ConfigurationError`` (the fix is the user's: ``chmod``/``chown``), and a
    ``BackendError`` when a backend operation finds it, so the manager's fault policy
    applies: a warning and no shared cache, or an error in strict mode.
    """


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def directory_problem(info: os.stat_result) -> str | None:
    """Why a directory with ``info`` is unsafe for tokens, or None."""
    problems = []
    euid = os.geteuid()
    if info.st_uid not in (euid, 0):
        also_root = " or root" if euid != 0 else ""
        problems.append(
            f"it is owned by {_user(info.st_uid)}, not by this user ({_user(euid)}){also_root}"
        )
    if info.st_mode & 0o022:
        problems.append("its group or others may write to it")
    return " and ".join(problems) or None


def _unsafe(directory: Path, info: os.stat_result, problem: str) -> UnsafeDirectoryError:
    mode = stat.S_IMODE(info.st_mode)
    return UnsafeDirectoryError(
        f"file backend directory {directory} (owner {_user(info.st_uid)}, mode {mode:04o}) "
        f"is unsafe: {problem}, so another local user could plant or replace tokens there. "
        f"Fix it with: chown {_user_name(os.geteuid())} {directory} && chmod 700 "
        f"{directory} (or use a new path: it is created with mode 0700)"
    )


def _symlink(directory: Path) -> UnsafeDirectoryError:
    return UnsafeDirectoryError(
        f"file backend directory {directory} is a symbolic link, which is never followed "
        "(whoever can change it chooses where tokens go); give the real directory"
    )


def check_directory_path(directory: Path) -> None:
    """At construction: refuse an existing directory that is unsafe or a symbolic link.

    A directory that does not exist yet is fine (it is created 0700); other errors
    (a file in the way, no permission) are left to the first operation to report.

    Raises:
        UnsafeDirectoryError: what is wrong and how to fix it.
    """
    try:
        info = os.lstat(directory)
    except OSError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _symlink(directory)
    if stat.S_ISDIR(info.st_mode):
        problem = directory_problem(info)
        if problem:
            raise _unsafe(directory, info, problem) from None


def open_directory(directory: Path, *, create: bool) -> int | None:
    """A descriptor of ``directory`` checked to be safe; None if it does not exist and
    ``create`` is false. The caller closes it.

    Raises:
        UnsafeDirectoryError: the directory is unsafe or a symbolic link (its
            ``__cause__`` says which, as an ``OSError``).
        OSError: it cannot be opened or created.
    """
    flags = os.O_RDONLY | _DIRECTORY | SAFE
    try:
        fd = os.open(directory, flags)
    except FileNotFoundError:
        if not create:
            return None
        # Mode 0700: private from the start. An existing path (made meanwhile by
        # someone else, or a dangling symlink, which mkdir never follows) is checked
        # or refused by the open below.
        with contextlib.suppress(FileExistsError):
            os.makedirs(directory, mode=0o700)
        fd = os.open(directory, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(directory):
            raise _symlink(directory) from exc
        raise
    try:
        info = os.fstat(fd)
        problem = directory_problem(info)
        if problem:
            mode = stat.S_IMODE(info.st_mode)
            cause = PermissionError(errno.EPERM, f"unsafe owner or mode {mode:04o}", str(directory))
            raise _unsafe(directory, info, problem) from cause
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def open_in(dfd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """``os.open(name, flags | O_NOFOLLOW | O_CLOEXEC)`` inside the directory ``dfd``.

    Raises:
        OSError: as ``os.open``; a symbolic link at ``name`` says so in plain words.
    """
    try:
        return os.open(name, flags | SAFE, mode, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP, "a symbolic link is there; it is never followed", name
            ) from exc
        raise


def file_problem(info: os.stat_result) -> str | None:
    """Why a token or back-off file with ``info`` must not be trusted, or None."""
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    euid = os.geteuid()
    if info.st_uid != euid:
        return f"is owned by {_user(info.st_uid)}, not by this user ({_user(euid)})"
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~0o600:
        return f"has mode {mode:04o}, wider than 0600"
    return None


def read_regular(
    dfd: int,
    name: str,
    limit: int,
    ignored: Callable[[str, os.stat_result | None, str], None],
) -> bytes | None:
    """The first ``limit`` bytes of ``name`` in ``dfd``; None if it is missing or not
    trusted (then ``ignored(name, info, why)`` is called first).

    Opened with ``O_NONBLOCK``: a FIFO planted there returns at once (and is refused)
    instead of blocking until some writer appears.
    """
    try:
        fd = open_in(dfd, name, os.O_RDONLY | _NONBLOCK | _NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            ignored(name, None, "is a symbolic link")
            return None
        raise
    try:
        info = os.fstat(fd)
        problem = file_problem(info)
        if problem:
            ignored(name, info, problem)
            return None
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(
    dfd: int,
    name: str,
    data: bytes,
    *,
    durable: bool,
    guard: Callable[[], AbstractContextManager[object]] | None = None,
) -> None:
    """Replace ``name`` in ``dfd`` with ``data``: readers see the old bytes or the new.

    A temporary file (``O_EXCL``, mode 0600) in the same directory is written, then
    renamed over ``name`` (under ``guard`` if given). A rename replaces a symbolic link
    at ``name`` and never follows it. ``durable`` adds the fsyncs that keep a crash from
    bringing back the old bytes.
    """
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = open_in(dfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        with guard() if guard is not None else contextlib.nullcontext():
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    if durable:
        os.fsync(dfd)  # makes the rename itself durable
