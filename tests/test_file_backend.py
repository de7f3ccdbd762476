"""FileBackend beyond the contract: damaged files, permissions, atomic writes, dead holders."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from backend_contract import make_token
from cryptography.fernet import Fernet

from cl_tokens import BackendError, ConfigurationError
from cl_tokens.backends import FileBackend, _file, backend_from_url
from cl_tokens.backends._codec import FernetCodec, JSONCodec, make_codec
from cl_tokens.backends._file import _stem

ROOT = Path(__file__).resolve().parent.parent
KEY = "cl_tokens:v1:0123abcd"
FILE = "cl_tokens.v1.0123abcd.json"


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[FileBackend]:
    backend = FileBackend(tmp_path / "a" / "b")
    async with backend:
        yield backend


def _valid_bytes() -> bytes:
    return JSONCodec().encode(make_token())


DAMAGED = {
    "empty": b"",
    "truncated": _valid_bytes()[:40],
    "binary": b"\x00\xff\xfe garbage \x80",
    "not-an-object": b"[1, 2, 3]",
    "unknown-version": b'{"v": 99, "token": {"access_token": "x", "expires_at": 1e12}}',
    "no-access-token": b'{"v": 1, "token": {"expires_at": 1e12}}',
    "deep-nesting": b"[" * 100_000,
    "encrypted-elsewhere": FernetCodec(Fernet.generate_key()).encode(make_token()),
}


def _with_field(name: str, raw: str) -> bytes:
    """A stored token whose field ``name`` is the JSON text ``raw``."""
    fields = {k: json.dumps(v) for k, v in make_token().to_dict().items()}
    fields[name] = raw
    inner = ",".join(f'"{k}":{v}' for k, v in fields.items())
    return b'{"v":1,"token":{' + inner.encode() + b"}}"


# Junk that once escaped as RecursionError/OverflowError (issue 11): numbers no float
# holds, and nesting deep enough to break a recursive parser, inside a valid envelope.
HUGE = "9" * 400
DAMAGED.update(
    {
        "400-digit-created-at": _with_field("created_at", HUGE),
        "400-digit-expires-at": _with_field("expires_at", HUGE),
        "400-digit-lifetime": _with_field("lifetime", HUGE),
        "400-digit-version": b'{"v":' + HUGE.encode() + b',"token":{}}',
        "deep-access-token": _with_field("access_token", "[" * 1000 + "]" * 1000),
        "deep-scope": _with_field("scope", "{" + '"a":{' * 5000 + "}" * 5001),
        "deep-token": b'{"v":1,"token":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }
)


@pytest.mark.parametrize("data", list(DAMAGED.values()), ids=list(DAMAGED))
async def test_damaged_file_is_a_miss_then_overwritten(backend: FileBackend, data: bytes) -> None:
    backend.directory.mkdir(parents=True)
    path = backend.directory / FILE
    path.write_bytes(data)
    os.chmod(path, 0o600)  # as this backend writes it: the codec, not the mode, decides
    assert await backend.get(KEY) is None
    assert await backend.delete(KEY, "whatever") is False
    token = make_token()
    await backend.set(KEY, token)
    assert await backend.get(KEY) == token


async def test_file_names_are_readable_and_distinct(backend: FileBackend) -> None:
    await backend.set(KEY, make_token())
    assert (backend.directory / FILE).is_file()
    keys = ["a:b", "a_b", "a.b", "a/b", "../x", "a%3Ab", ":lock", "é", "x" * 300, "y" * 300]
    stems = {_stem(key) for key in keys}
    assert len(stems) == len(keys)
    assert all("/" not in s and s not in ("", ".", "..") and len(s) < 250 for s in stems)
    for n, key in enumerate(keys):
        await backend.set(key, make_token(access=f"tok-{n}"))
    for n, key in enumerate(keys):
        stored = await backend.get(key)
        assert stored is not None
        assert stored.access_token == f"tok-{n}"
    assert {p.parent for p in backend.directory.iterdir()} == {backend.directory}


async def test_modes_are_private(backend: FileBackend) -> None:
    await backend.set(KEY, make_token())
    handle = await backend.acquire_lock(KEY, lease=10)
    assert handle is not None
    await backend.release_lock(handle)
    await backend.delete(KEY, "other")  # creates the mutex file
    assert stat.S_IMODE(backend.directory.stat().st_mode) == 0o700
    for path in backend.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def _directory_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "file backend directory" in r.getMessage()]


async def test_fresh_directory_is_created_private_without_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    async with FileBackend(tmp_path / "fresh") as backend:
        await backend.set(KEY, make_token())
        await backend.set(KEY, make_token())
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    assert _directory_warnings(caplog) == []


async def test_existing_private_directory_is_used_without_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    directory = tmp_path / "mine"
    directory.mkdir(mode=0o700)
    async with FileBackend(directory) as backend:
        await backend.set(KEY, make_token())
    assert _directory_warnings(caplog) == []


async def test_writes_leave_no_temporary_files(backend: FileBackend) -> None:
    await asyncio.gather(*(backend.set(KEY, make_token()) for _ in range(30)))
    names = {p.name for p in backend.directory.iterdir()}
    assert names == {FILE, FILE.replace(".json", ".mutex")}
    assert await backend.get(KEY) is not None


async def test_failed_write_keeps_the_old_token_and_no_temp_file(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = make_token()
    await backend.set(KEY, old)

    def broken_replace(src: str, dst: str, **dir_fds: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BackendError) as caught:
        await backend.set(KEY, make_token())
    assert isinstance(caught.value.__cause__, OSError)
    monkeypatch.undo()
    assert await backend.get(KEY) == old
    assert not [p for p in backend.directory.iterdir() if p.name.endswith(".tmp")]


async def test_missing_directory_is_a_miss(backend: FileBackend) -> None:
    assert not backend.directory.exists()
    assert await backend.get(KEY) is None
    assert await backend.delete(KEY) is False
    assert await backend.delete(KEY, "token") is False
    assert not backend.directory.exists()


async def test_os_errors_become_backend_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    backend = FileBackend(blocker)  # a file where the directory goes
    calls = {
        "read": backend.get(KEY),
        "write": backend.set(KEY, make_token()),
        "delete": backend.delete(KEY, "token"),
        "lock": backend.acquire_lock(KEY, lease=1),
        "read the back-off of": backend.get_backoff(KEY),
        "write the back-off of": backend.set_backoff(KEY, time.time() + 5),
    }
    for action, call in calls.items():
        with pytest.raises(BackendError, match=f"could not {action} ") as caught:
            await call
        assert isinstance(caught.value.__cause__, NotADirectoryError), action


async def test_a_directory_at_the_token_path_is_a_miss_and_a_failed_write(
    backend: FileBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    (backend.directory / FILE).mkdir(parents=True)
    assert await backend.get(KEY) is None
    assert "is not a regular file" in caplog.text
    with pytest.raises(BackendError, match="could not write") as caught:
        await backend.set(KEY, make_token())
    assert isinstance(caught.value.__cause__, IsADirectoryError)


async def test_same_process_acquires_conflict(tmp_path: Path) -> None:
    first, second = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await first.acquire_lock(KEY, lease=10)
    assert handle is not None
    assert await second.acquire_lock(KEY, lease=10) is None
    assert await first.acquire_lock(KEY, lease=10) is None
    await second.release_lock(handle)  # another instance's handle: not its lock
    assert await second.acquire_lock(KEY, lease=10) is None
    await first.release_lock(handle)
    taken = await second.acquire_lock(KEY, lease=10)
    assert taken is not None
    await second.aclose()  # closing drops the locks it holds
    again = await first.acquire_lock(KEY, lease=10)
    assert again is not None
    await first.aclose()


async def test_cancelled_acquire_leaves_the_key_unlocked(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = backend._take_lock

    def slow_take_lock(key: str) -> int | None:
        time.sleep(0.3)
        return real(key)

    monkeypatch.setattr(backend, "_take_lock", slow_take_lock)
    task = asyncio.create_task(backend.acquire_lock(KEY, lease=10))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)  # the abandoned thread takes the lock, then drops it
    monkeypatch.undo()
    handle = await backend.acquire_lock(KEY, lease=10)
    assert handle is not None
    await backend.release_lock(handle)


HOLDER = textwrap.dedent(
    """
    import asyncio, sys, time
    from cl_tokens.backends import FileBackend

    async def main():
        handle = await FileBackend(sys.argv[1]).acquire_lock(sys.argv[2], lease=1)
        print("locked" if handle else "busy", flush=True)
        time.sleep(120)

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_lock_is_released_when_the_holder_is_killed(backend: FileBackend) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    holder = subprocess.Popen(  # noqa: ASYNC220 - starting it is quick; waits go to threads
        [sys.executable, "-c", HOLDER, str(backend.directory), KEY],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line.strip() == b"locked"
        await asyncio.sleep(1.5)  # past the holder's lease: the lease is not what frees it
        assert await backend.acquire_lock(KEY, lease=10) is None
        os.kill(holder.pid, signal.SIGKILL)
        await asyncio.to_thread(holder.wait, 10)
        handle = await backend.acquire_lock(KEY, lease=10)
        assert handle is not None
        await backend.release_lock(handle)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


async def test_encrypted_round_trip_and_wrong_key(tmp_path: Path) -> None:
    key, other = Fernet.generate_key(), Fernet.generate_key()
    token = make_token()
    async with FileBackend(tmp_path, encryption_key=key) as sealed:
        await sealed.set(KEY, token)
        assert await sealed.get(KEY) == token
    raw = (tmp_path / FILE).read_bytes()
    assert token.access_token.encode() not in raw
    assert b"access_token" not in raw
    assert await FileBackend(tmp_path).get(KEY) is None
    wrong = FileBackend(tmp_path, encryption_key=other)
    assert await wrong.get(KEY) is None
    assert await wrong.delete(KEY, token.access_token) is False
    # Rotation: the new key first, the old one still decrypts.
    rotated = FileBackend(tmp_path, encryption_key=[other, key.decode()])
    assert await rotated.get(KEY) == token
    assert await rotated.delete(KEY, token.access_token) is True


def test_from_url(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    backend = backend_from_url(f"file://{tmp_path}/tokens", encryption_key=key)
    assert isinstance(backend, FileBackend)
    assert backend.directory == tmp_path / "tokens"
    assert repr(backend) == f"FileBackend(directory={str(tmp_path / 'tokens')!r}, encrypted=True)"
    assert key.decode() not in repr(backend)
    assert isinstance(backend_from_url(f"file://localhost{tmp_path}"), FileBackend)


@pytest.mark.parametrize(
    "url",
    ["file://relative/dir", "file:///", "file://", "file:///x?encryption_key=c2VjcmV0LWtleQ=="],
)
def test_bad_file_urls(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url(url)
    assert "c2VjcmV0LWtleQ" not in str(caught.value)


def test_codec_never_raises_on_junk() -> None:
    key = Fernet.generate_key()
    codecs = [JSONCodec(), make_codec(key)]
    samples = [*DAMAGED.values(), os.urandom(64), b"gAAAAA" + os.urandom(80), b"\xff" * 10]
    for codec in codecs:
        for data in samples:
            assert codec.decode(data) is None
    # Junk sealed with the right key: decrypts, then must still be a miss.
    sealed = make_codec(key)
    for name, data in DAMAGED.items():
        if name != "encrypted-elsewhere":
            assert sealed.decode(Fernet(key).encrypt(data)) is None, name


def test_bad_encryption_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not a Fernet key") as caught:
        FileBackend("/tmp/x", encryption_key="c2VjcmV0LWtleQ==")
    assert "c2VjcmV0LWtleQ" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="empty"):
        FileBackend("/tmp/x", encryption_key=[])


def test_missing_cryptography_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'cl-tokens\[encryption\]'"):
        FileBackend("/tmp/x", encryption_key="anything")
    assert isinstance(FileBackend("/tmp/x"), FileBackend)


async def test_a_hung_filesystem_does_not_pile_up_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cl_tokens._shared import within

    hung = threading.Event()

    def stuck_read(*args: object) -> bytes | None:
        hung.wait(10)  # a read on a filesystem that does not answer
        return None

    monkeypatch.setattr(_file, "read_regular", stuck_read)
    backend = FileBackend(tmp_path / "tokens")
    backend.directory.mkdir(mode=0o700)
    before = threading.active_count()
    for _ in range(_file._MAX_STUCK):
        with pytest.raises(asyncio.TimeoutError):
            await within(backend.get("cl_tokens:v1:k"), 0.05)
    await asyncio.sleep(0.01)  # the abandoned calls unwind
    for _ in range(20):  # no new threads: fails at once
        with pytest.raises(BackendError, match="still blocked"):
            await backend.get("cl_tokens:v1:k")
    assert threading.active_count() <= before + _file._MAX_STUCK
    hung.set()  # the filesystem answers again
    for _ in range(200):
        try:
            assert await backend.get("cl_tokens:v1:k") is None
            break
        except BackendError:
            await asyncio.sleep(0.01)
    else:
        pytest.fail("the backend never recovered once the threads returned")


async def test_every_failure_is_a_backend_error_with_its_cause(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = make_token()
    await backend.set(KEY, token)
    handle = await backend.acquire_lock(KEY, lease=5)
    assert handle is not None

    async def broken_run(func: object, *args: object) -> None:
        raise RuntimeError("not an OSError")

    with monkeypatch.context() as patch:
        patch.setattr(backend._threads, "run", broken_run)
        calls = {
            "get": backend.get(KEY),
            "set": backend.set(KEY, token),
            "delete": backend.delete(KEY),
            "delete_if": backend.delete(KEY, token.access_token),
            "acquire_lock": backend.acquire_lock(KEY, lease=5),
            "get_backoff": backend.get_backoff(KEY),
            "set_backoff": backend.set_backoff(KEY, time.time() + 5),
        }
        for name, call in calls.items():
            with pytest.raises(BackendError) as caught:
                await call
            assert isinstance(caught.value.__cause__, RuntimeError), name

    def broken_codec(*args: object) -> None:
        raise KeyError("a codec bug")

    with monkeypatch.context() as patch:
        patch.setattr(backend._codec, "decode", broken_codec)
        patch.setattr(backend._codec, "encode", broken_codec)
        for call in (backend.get(KEY), backend.set(KEY, token)):
            with pytest.raises(BackendError) as caught:
                await call
            assert isinstance(caught.value.__cause__, KeyError)

    def broken_flock(fd: int, operation: int) -> None:
        raise OSError(5, "I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(_file.fcntl, "flock", broken_flock)
        with pytest.raises(BackendError, match="could not unlock") as caught:
            await backend.release_lock(handle)
        assert isinstance(caught.value.__cause__, OSError)
    assert await backend.get(KEY) == token


async def test_a_cancelled_call_is_cancelled_not_wrapped(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.set(KEY, make_token())
    release = threading.Event()

    def slow_read(*args: object) -> bytes | None:
        release.wait(10)
        return None

    monkeypatch.setattr(_file, "read_regular", slow_read)
    task = asyncio.ensure_future(backend.get(KEY))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()


async def test_every_open_refuses_symlinks_and_closes_on_exec(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path: str, flags: int, *args: object, **kwargs: object) -> int:
        opened.append((str(path), flags))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording_open)
    token = make_token()
    await backend.set(KEY, token)
    assert await backend.get(KEY) == token
    handle = await backend.acquire_lock(KEY, lease=5)
    assert handle is not None
    await backend.release_lock(handle)
    await backend.set_backoff(KEY, time.time() + 5)
    assert await backend.get_backoff(KEY) is not None
    assert await backend.delete(KEY, token.access_token) is True
    suffixes = {Path(path).suffix for path, _ in opened}
    assert {".json", ".lock", ".mutex", ".backoff", ".tmp", ""} <= suffixes  # "": the dir
    for path, flags in opened:
        assert flags & os.O_NOFOLLOW, path
        assert flags & os.O_CLOEXEC, path
