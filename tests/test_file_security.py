"""Attacks on the file backend by another local user (issue 10).

The attacker is ``nobody``: they own a directory, or could write to one, or planted a
file or a symbolic link in it. The victim is this process, running as root as CI does
(root follows symlinks and may write anywhere, which is what makes planted links
dangerous). Acting as ``nobody`` takes ``os.chown``, so these tests need root: run as
a normal user they fail and say so (deselect them with ``-m "not root"``).
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import time
from pathlib import Path

import pytest
from backend_contract import make_token

from cl_tokens import BackendError, ConfigurationError, TokenManager
from cl_tokens.backends import FileBackend
from cl_tokens.backends._codec import JSONCodec
from cl_tokens.backends._file import _stem
from cl_tokens.testing import FakeAuthServer

pytestmark = pytest.mark.root

KEY = "cl_tokens:v2:" + "ab" * 20
STEM = _stem(KEY)


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "these attacks need root to act as the user 'nobody' (os.chown); CI runs as "
            "root. Run them as root, or deselect them with -m 'not root'"
        )


@pytest.fixture
def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Where the attacker wants root to write: no file may ever appear here."""
    place = tmp_path / "outside"
    place.mkdir()
    return place


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    return directory


def planted_token(path: Path, owner: int, mode: int = 0o600) -> str:
    """A well-formed token file at ``path`` owned by ``owner``; its access token."""
    token = make_token(access="planted-by-attacker")
    path.write_bytes(JSONCodec().encode(token))
    path.chmod(mode)
    os.chown(path, owner, owner)
    return token.access_token


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def every_operation(backend: FileBackend) -> dict[str, BaseException | object]:
    """Run each backend method once; what each returned or raised."""
    calls = {
        "get": backend.get(KEY),
        "set": backend.set(KEY, make_token()),
        "delete": backend.delete(KEY),
        "delete_if": backend.delete(KEY, "planted-by-attacker"),
        "acquire_lock": backend.acquire_lock(KEY, lease=5),
        "get_backoff": backend.get_backoff(KEY),
        "set_backoff": backend.set_backoff(KEY, time.time() + 30),
    }
    outcomes: dict[str, BaseException | object] = {}
    for name, call in calls.items():
        try:
            outcomes[name] = await call
        except Exception as exc:
            outcomes[name] = exc
    return outcomes


def assert_all_refused(outcomes: dict[str, BaseException | object], directory: Path) -> None:
    for name, outcome in outcomes.items():
        assert isinstance(outcome, BackendError), (name, outcome)
        assert isinstance(outcome, ConfigurationError), name
        assert isinstance(outcome.__cause__, OSError), name
        assert str(directory) in str(outcome), name


# -- the directory ------------------------------------------------------------------------


async def test_world_writable_directory_is_refused_and_its_planted_token_never_served(
    cache: Path, nobody: int
) -> None:
    os.chmod(cache, 0o777)
    planted_token(cache / f"{STEM}.json", owner=0)  # even one that looks like ours
    with pytest.raises(ConfigurationError) as caught:
        FileBackend(cache)
    message = str(caught.value)
    assert str(cache) in message
    assert "mode 0777" in message
    assert "owner uid 0 (root)" in message
    assert f"chmod 700 {cache}" in message
    assert names(cache) == {f"{STEM}.json"}


async def test_directory_made_unsafe_after_construction_is_refused_on_every_operation(
    cache: Path,
) -> None:
    backend = FileBackend(cache)
    token = make_token()
    await backend.set(KEY, token)
    os.chmod(cache, 0o777)
    before = names(cache)
    outcomes = await every_operation(backend)
    assert_all_refused(outcomes, cache)
    assert "mode 0777" in str(outcomes["get"])
    assert names(cache) == before  # nothing written, nothing deleted
    os.chmod(cache, 0o700)  # fixed: served again
    assert await backend.get(KEY) == token


async def test_group_writable_directory_is_refused(cache: Path) -> None:
    os.chmod(cache, 0o770)
    with pytest.raises(ConfigurationError, match="its group or others may write to it"):
        FileBackend(cache)


async def test_directory_owned_by_nobody_is_refused(cache: Path, nobody: int) -> None:
    os.chown(cache, nobody, nobody)  # mode 0700, but theirs
    with pytest.raises(ConfigurationError) as caught:
        FileBackend(cache)
    message = str(caught.value)
    assert f"owned by uid {nobody} (nobody)" in message
    assert "mode 0700" in message
    assert f"chown root {cache}" in message


async def test_directory_the_attacker_makes_first_is_refused_and_its_token_never_served(
    tmp_path: Path, nobody: int
) -> None:
    # The victim configures a path that does not exist yet; nobody creates it first
    # (as under /tmp) and plants a well-formed token in it.
    directory = tmp_path / "cl-tokens"
    backend = FileBackend(directory)
    directory.mkdir(mode=0o700)
    os.chown(directory, nobody, nobody)
    planted_token(directory / f"{STEM}.json", owner=nobody)
    outcomes = await every_operation(backend)
    assert_all_refused(outcomes, directory)
    assert names(directory) == {f"{STEM}.json"}


async def test_manager_refuses_an_unsafe_directory_and_stops_sharing_one_made_unsafe(
    server: FakeAuthServer, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    unsafe.chmod(0o757)
    with pytest.raises(ConfigurationError, match="is unsafe"):
        TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, backend=f"file://{unsafe}"
        )
    # Made unsafe while a manager uses it: it warns, stops sharing, and keeps working.
    async with TokenManager(
        server.client_id, server.client_secret, auth_url=server.url, backend=f"file://{cache}"
    ) as manager:
        os.chmod(cache, 0o777)
        planted_token(cache / "planted.json", owner=0)  # (any name: nothing is read)
        token = await manager.token()
        assert token.access_token in server.issued
        assert server.token_requests == 1
    assert warnings_about(caplog, "is unsafe")
    assert names(cache) == {"planted.json"}  # nothing shared through it


async def test_directory_that_is_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(outside)
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        FileBackend(link)
    # Planted after construction: every operation refuses it.
    later = tmp_path / "later"
    backend = FileBackend(later)
    later.symlink_to(outside)
    outcomes = await every_operation(backend)
    for name, outcome in outcomes.items():
        assert isinstance(outcome, BackendError), name
        assert "is a symbolic link" in str(outcome), name
        assert isinstance(outcome.__cause__, OSError), name
    assert names(outside) == set()


# -- files in a safe directory ------------------------------------------------------------


async def test_token_file_owned_by_nobody_is_a_miss_with_one_warning(
    cache: Path, nobody: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    planted = planted_token(cache / f"{STEM}.json", owner=nobody)
    backend = FileBackend(cache)
    assert await backend.get(KEY) is None
    assert await backend.get(KEY) is None
    assert await backend.delete(KEY, planted) is False  # not theirs to compare with
    (warning,) = warnings_about(caplog, "ignored")
    assert f"{STEM}.json" in warning
    assert f"owned by uid {nobody} (nobody)" in warning
    assert planted not in caplog.text
    mine = make_token()
    await backend.set(KEY, mine)  # the write replaces it
    assert await backend.get(KEY) == mine
    assert (cache / f"{STEM}.json").stat().st_uid == 0


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700, 0o666], ids=lambda m: f"{m:04o}")
async def test_token_file_others_may_read_is_a_miss(
    cache: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    planted_token(cache / f"{STEM}.json", owner=0, mode=mode)
    assert await FileBackend(cache).get(KEY) is None
    (warning,) = warnings_about(caplog, "ignored")
    assert f"has mode {mode:04o}, wider than 0600" in warning


async def test_backoff_file_owned_by_nobody_is_ignored(
    cache: Path, nobody: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A planted back-off would stop every process from ever asking for a token.
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    path = cache / f"{STEM}.backoff"
    path.write_text(f"{time.time() + 3600}\n")
    path.chmod(0o600)
    os.chown(path, nobody, nobody)
    backend = FileBackend(cache)
    assert await backend.get_backoff(KEY) is None
    assert warnings_about(caplog, f"{STEM}.backoff")
    path.chmod(0o644)
    os.chown(path, 0, 0)
    assert await backend.get_backoff(KEY) is None


async def test_fifo_at_the_token_path_is_a_miss_not_a_hang(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    os.mkfifo(cache / f"{STEM}.json", 0o600)
    backend = FileBackend(cache)
    assert await backend.get(KEY) is None  # opened without blocking, then refused
    assert "is not a regular file" in caplog.text
    await backend.set(KEY, make_token())
    assert stat.S_ISREG((cache / f"{STEM}.json").stat().st_mode)


# -- planted symbolic links ---------------------------------------------------------------


async def test_symlink_at_the_token_path_is_never_followed(
    cache: Path, outside: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    target = outside / "their-token.json"
    planted = planted_token(target, owner=0)  # a good token file, but not in the directory
    before = target.read_bytes()
    (cache / f"{STEM}.json").symlink_to(target)
    backend = FileBackend(cache)
    assert await backend.get(KEY) is None
    assert await backend.delete(KEY, planted) is False
    assert "is a symbolic link" in caplog.text
    await backend.set(KEY, make_token())  # replaces the link itself
    assert not (cache / f"{STEM}.json").is_symlink()
    assert target.read_bytes() == before
    assert names(outside) == {"their-token.json"}


async def test_symlink_at_the_backoff_path_is_never_followed(cache: Path, outside: Path) -> None:
    target = outside / "victim"
    (cache / f"{STEM}.backoff").symlink_to(target)  # dangling: O_CREAT would make it
    backend = FileBackend(cache)
    assert await backend.get_backoff(KEY) is None
    retry_at = time.time() + 30
    await backend.set_backoff(KEY, retry_at)
    assert not (cache / f"{STEM}.backoff").is_symlink()
    assert await backend.get_backoff(KEY) == retry_at
    assert names(outside) == set()


async def test_symlink_at_the_lock_path_is_refused_and_creates_nothing(
    cache: Path, outside: Path
) -> None:
    (cache / f"{STEM}.lock").symlink_to(outside / "victim")
    backend = FileBackend(cache)
    with pytest.raises(BackendError, match="symbolic link") as caught:
        await backend.acquire_lock(KEY, lease=5)
    assert isinstance(caught.value.__cause__, OSError)
    assert names(outside) == set()


async def test_symlink_at_the_mutex_path_is_refused_and_creates_nothing(
    cache: Path, outside: Path
) -> None:
    backend = FileBackend(cache)
    old = make_token()
    await backend.set(KEY, old)
    (cache / f"{STEM}.mutex").unlink()
    (cache / f"{STEM}.mutex").symlink_to(outside / "victim")
    with pytest.raises(BackendError, match="symbolic link"):
        await backend.set(KEY, make_token())
    with pytest.raises(BackendError, match="symbolic link"):
        await backend.delete(KEY, old.access_token)
    assert names(outside) == set()
    assert await backend.get(KEY) == old  # untouched
    assert not [n for n in names(cache) if n.endswith(".tmp")]


async def test_held_lock_descriptor_is_close_on_exec(cache: Path) -> None:
    backend = FileBackend(cache)
    handle = await backend.acquire_lock(KEY, lease=5)
    assert handle is not None
    fd = backend._held[handle.owner]
    assert not os.get_inheritable(fd)
    await backend.release_lock(handle)
