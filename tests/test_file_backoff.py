"""The file backend's shared back-off (issue 11): ``<stem>.backoff`` holds ``retry_at``.

Every process of the machine reads it, so after a 429 none of them asks for a token
before ``retry_at``. A missing, expired or junk file is no back-off: junk must never
stop a fleet from asking for ever.
"""

from __future__ import annotations

import asyncio
import math
import stat
from pathlib import Path

import pytest
from fakeclock import FakeClock

from cl_tokens import BackendError
from cl_tokens.backends import FileBackend
from cl_tokens.backends._file import _stem

KEY = "cl_tokens:v2:" + "ef" * 20
BACKOFF = _stem(KEY) + ".backoff"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend(tmp_path: Path, clock: FakeClock) -> FileBackend:
    return FileBackend(tmp_path / "cache", clock=clock)


async def test_no_backoff_until_one_is_set(backend: FileBackend) -> None:
    assert await backend.get_backoff(KEY) is None  # no directory yet
    assert not backend.directory.exists()  # reading creates nothing


async def test_backoff_is_shared_and_private(
    tmp_path: Path, backend: FileBackend, clock: FakeClock
) -> None:
    retry_at = clock.time() + 60.123456789
    await backend.set_backoff(KEY, retry_at)
    other = FileBackend(backend.directory, clock=clock)  # another process's backend
    assert await other.get_backoff(KEY) == retry_at  # exactly, not rounded
    assert await backend.get_backoff("cl_tokens:v2:another") is None
    path = backend.directory / BACKOFF
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in backend.directory.iterdir()) == [BACKOFF]  # no temp file


async def test_backoff_expires_at_retry_at(backend: FileBackend, clock: FakeClock) -> None:
    await backend.set_backoff(KEY, clock.time() + 30)
    clock.advance(29.9)
    assert await backend.get_backoff(KEY) is not None
    clock.advance(0.1)
    assert await backend.get_backoff(KEY) is None


async def test_a_later_backoff_replaces_the_earlier(backend: FileBackend, clock: FakeClock) -> None:
    await backend.set_backoff(KEY, clock.time() + 5)
    await backend.set_backoff(KEY, clock.time() + 50)
    assert await backend.get_backoff(KEY) == clock.time() + 50
    await asyncio.gather(*(backend.set_backoff(KEY, clock.time() + n) for n in range(1, 30)))
    assert await backend.get_backoff(KEY) in {clock.time() + n for n in range(1, 30)}
    assert not [p for p in backend.directory.iterdir() if p.name.endswith(".tmp")]


async def test_backoff_does_not_touch_the_token(backend: FileBackend, clock: FakeClock) -> None:
    await backend.set_backoff(KEY, clock.time() + 30)
    assert await backend.get(KEY) is None
    assert await backend.delete(KEY) is False
    assert await backend.get_backoff(KEY) is not None


JUNK = {
    "empty": b"",
    "words": b"retry later",
    "nan": b"nan",
    "inf": b"inf",
    "minus-inf": b"-inf",
    "400-digits": b"9" * 400,
    "huge-exponent": b"1e400",
    "binary": b"\xff\xfe\x00\x01",
    "json": b'{"retry_at": 1700000030}',
    "in-the-past": b"1699999999.0",
    "a-year-ahead": b"1731536000.0",
    "too-long": b"1700000030." + b"0" * 200,
}


@pytest.mark.parametrize("data", list(JUNK.values()), ids=list(JUNK))
async def test_junk_backoff_is_no_backoff(backend: FileBackend, data: bytes) -> None:
    backend.directory.mkdir(mode=0o700)
    path = backend.directory / BACKOFF
    path.write_bytes(data)
    path.chmod(0o600)
    assert await backend.get_backoff(KEY) is None


async def test_backoff_written_by_hand_is_read(backend: FileBackend, clock: FakeClock) -> None:
    # The format is one number, so an operator can read (and clear) it.
    backend.directory.mkdir(mode=0o700)
    path = backend.directory / BACKOFF
    path.write_bytes(b" 1700000042.5\n")
    path.chmod(0o600)
    assert await backend.get_backoff(KEY) == 1700000042.5
    await backend.set_backoff(KEY, 1700000043.25)
    assert path.read_bytes().strip() == b"1700000043.25"


@pytest.mark.parametrize("retry_at", [math.nan, math.inf, -math.inf])
async def test_a_non_finite_backoff_is_refused(backend: FileBackend, retry_at: float) -> None:
    with pytest.raises(BackendError, match="could not write the back-off") as caught:
        await backend.set_backoff(KEY, retry_at)
    assert isinstance(caught.value.__cause__, ValueError)
    assert await backend.get_backoff(KEY) is None
