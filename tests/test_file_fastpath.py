"""The file backend's cold path in one thread hop per step, and waiters woken by the
write (issue 15).

Hops are counted at the backend's thread pool and wake-ups by the checks the waiter
made, never by timings: the safety-net re-check is pushed out of reach, so a waiter
that the push failed to wake would time out and fail the test.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backend_contract import make_token

from cl_tokens import BackendError, Token
from cl_tokens.backends import FileBackend, LockHandle, _file_watch
from cl_tokens.backends._file import _stem

KEY = "cl_tokens:v2:" + "fa" * 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_safety_net(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only a push may wake a waiter in these tests.
    monkeypatch.setattr(_file_watch, "_RECHECK", 120.0)


def _count_hops(backend: FileBackend) -> list[int]:
    counter = [0]
    real = backend._threads.run

    async def counted(*args: Any) -> Any:
        counter[0] += 1
        return await real(*args)

    backend._threads.run = counted  # type: ignore[method-assign]
    return counter


def _count_peeks(backend: FileBackend, before: Callable[[int], None] | None = None) -> list[int]:
    """Count the waiter's checks; ``before(n)`` runs after check n read the files."""
    counter = [0]
    real = backend._watcher._peek

    def counted(key: str) -> tuple[Token | None, bool]:
        counter[0] += 1
        seen = real(key)
        if before is not None:
            before(counter[0])
        return seen

    backend._watcher._peek = counted
    return counter


def _open_fds() -> set[tuple[str, str]]:
    """This process's descriptors with what they point at. Compared as sets: a file
    call of an earlier test that is still stuck may close one of its own meanwhile."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return fds


async def test_cold_get_or_lock_and_set_and_release_take_one_thread_hop_each(
    tmp_path: Path,
) -> None:
    backend = FileBackend(tmp_path)
    hops = _count_hops(backend)
    token = make_token()
    handle = await backend.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    assert hops[0] == 1
    await backend.set_and_release(KEY, token, handle)
    assert hops[0] == 2
    assert await backend.get_or_lock(KEY, lease=60) == token  # warm: one hop too
    assert hops[0] == 3
    # The lock was released: a refused token makes the next call take it.
    again = await backend.get_or_lock(KEY, lease=60, refuse=token.access_token)
    assert isinstance(again, LockHandle)
    assert hops[0] == 4
    await backend.release_lock(again)
    await backend.aclose()


async def test_a_second_caller_is_told_to_wait_while_the_lock_is_held(tmp_path: Path) -> None:
    first, second = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await first.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    assert await second.get_or_lock(KEY, lease=60) is None
    await first.release_lock(handle)
    taken = await second.get_or_lock(KEY, lease=60)
    assert isinstance(taken, LockHandle)
    await second.release_lock(taken)


async def test_a_waiter_is_woken_by_the_write_without_polling(tmp_path: Path) -> None:
    writer, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await writer.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    peeks = _count_peeks(reader)
    hops = _count_hops(reader)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30, poll=0.001))
    await asyncio.sleep(0.3)  # a poller at 1 ms would have checked ~300 times by now
    assert not waiting.done()
    token = make_token()
    await writer.set_and_release(KEY, token, handle)
    assert await waiting == token
    # The first check, then the rename's event (the release's may come too).
    assert peeks[0] <= 3
    assert hops[0] == 0  # checks run on the watcher's thread, not the pool
    await writer.aclose()
    await reader.aclose()


async def test_a_write_between_the_check_and_the_wait_is_not_lost(tmp_path: Path) -> None:
    writer, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await writer.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    token = make_token()
    data = writer._codec.encode(token)
    fd = writer._held.pop(handle.owner)

    def write_after_first_check(n: int) -> None:
        # The first check saw "held, no token"; the write lands before the waiter waits.
        if n == 1:
            from cl_tokens.backends._file_locks import LockHandoff

            writer._write_and_unlock(KEY, data, LockHandoff(fd))

    peeks = _count_peeks(reader, write_after_first_check)
    assert await reader.wait_for(KEY, timeout=10) == token
    assert peeks[0] >= 2
    await reader.aclose()


async def test_a_release_without_a_write_ends_the_wait_at_once(tmp_path: Path) -> None:
    holder, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await holder.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await holder.release_lock(handle)
    assert await waiting is None  # long before the timeout: the caller takes the lock
    taken = await reader.get_or_lock(KEY, lease=60)
    assert isinstance(taken, LockHandle)
    await reader.release_lock(taken)
    await reader.aclose()


async def test_a_holder_killed_with_sigkill_wakes_the_waiters(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from cl_tokens.backends import FileBackend, LockHandle
        async def main():
            handle = await FileBackend({str(tmp_path)!r}).get_or_lock({KEY!r}, lease=60)
            assert isinstance(handle, LockHandle)
            print("locked", flush=True)
            time.sleep(600)
        asyncio.run(main())
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        assert child.stdout is not None
        line = await child.stdout.readline()
        assert line.strip() == b"locked"
        readers = [FileBackend(tmp_path) for _ in range(3)]
        assert await readers[0].get_or_lock(KEY, lease=60) is None
        waits = [asyncio.ensure_future(r.wait_for(KEY, timeout=60)) for r in readers]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waits)
        os.kill(child.pid, signal.SIGKILL)
        assert await asyncio.gather(*waits) == [None, None, None]
        taken = await readers[0].get_or_lock(KEY, lease=60)
        assert isinstance(taken, LockHandle)
        await readers[0].release_lock(taken)
        for reader in readers:
            await reader.aclose()
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def test_several_waiters_of_several_keys_share_one_watch(tmp_path: Path) -> None:
    writer, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    keys = [f"{KEY}{i}" for i in range(3)]
    handles = [await writer.get_or_lock(key, lease=60) for key in keys]
    waits = {
        key: [asyncio.ensure_future(reader.wait_for(key, timeout=30)) for _ in range(3)]
        for key in keys
    }
    await asyncio.sleep(0.2)
    tokens = {key: make_token() for key in keys}
    for key, handle in zip(keys, handles, strict=True):
        assert isinstance(handle, LockHandle)
        await writer.set_and_release(key, tokens[key], handle)
    for key in keys:
        assert await asyncio.gather(*waits[key]) == [tokens[key]] * 3
    assert reader._watcher._fd >= 0  # one descriptor for all of them
    assert reader._watcher._waiters == {}
    await reader.aclose()


async def test_a_refused_token_keeps_the_waiter_waiting(tmp_path: Path) -> None:
    writer, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    old = make_token()
    await writer.set(KEY, old)
    handle = await writer.get_or_lock(KEY, lease=60, refuse=old.access_token)
    assert isinstance(handle, LockHandle)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30, refuse=old.access_token))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    new = make_token()
    await writer.set_and_release(KEY, new, handle)
    assert await waiting == new
    await reader.aclose()


async def test_a_cancelled_wait_leaves_no_waiter_behind(tmp_path: Path) -> None:
    holder, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await holder.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert reader._watcher._waiters == {}
    assert await reader.wait_for(KEY, timeout=0.05) is None  # bounded by its timeout
    await holder.release_lock(handle)
    await reader.aclose()


@pytest.mark.parametrize("junk", [b"", b"\0" * 512, b"torn"])
async def test_a_torn_token_file_is_a_miss(tmp_path: Path, junk: bytes) -> None:
    backend = FileBackend(tmp_path)
    token = make_token()
    await backend.set(KEY, token)
    path = tmp_path / (_stem(KEY) + ".json")
    whole = path.read_bytes()
    # What a crash can leave without fsync: nothing, zeros, or the first part.
    path.write_bytes(junk if junk != b"torn" else whole[: len(whole) // 2])
    outcome = await backend.get_or_lock(KEY, lease=60)
    assert isinstance(outcome, LockHandle)
    await backend.release_lock(outcome)
    await backend.aclose()


async def test_planted_symlinks_are_still_refused(tmp_path: Path) -> None:
    directory = tmp_path / "tokens"
    backend = FileBackend(directory)
    token = make_token()
    await backend.set(KEY + "x", token)
    real = directory / (_stem(KEY + "x") + ".json")
    (directory / (_stem(KEY) + ".json")).symlink_to(real)
    outcome = await backend.get_or_lock(KEY, lease=60)
    assert isinstance(outcome, LockHandle)  # the linked token is not read
    await backend.release_lock(outcome)
    (directory / (_stem(KEY) + ".lock")).unlink()
    (directory / (_stem(KEY) + ".lock")).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BackendError, match="symbolic link"):
        await backend.get_or_lock(KEY, lease=60)
    assert not (tmp_path / "elsewhere").exists()
    await backend.aclose()


async def test_descriptors_stay_stable_across_many_waits(tmp_path: Path) -> None:
    baseline = _open_fds()
    writer, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    for i in range(3):  # warm up: threads and the watch
        assert await reader.wait_for(f"{KEY}w{i}", timeout=0.01) is None
    warm = _open_fds()
    for i in range(100):
        key = f"{KEY}{i}"
        handle = await writer.get_or_lock(key, lease=60)
        assert isinstance(handle, LockHandle)
        waiting = asyncio.ensure_future(reader.wait_for(key, timeout=30))
        if i % 2:
            await asyncio.sleep(0)
        await writer.set_and_release(key, make_token(), handle)
        assert isinstance(await waiting, Token)
    assert _open_fds() - warm == set()
    assert any("inotify" in target for _, target in warm - baseline)
    await writer.aclose()
    await reader.aclose()
    for _ in range(500):  # the watcher's thread closes its descriptors as it ends
        if not _open_fds() - baseline:
            break
        await asyncio.sleep(0.01)
    assert _open_fds() - baseline == set()


def _child_waits(directory: str, backend: FileBackend, queue: Any) -> None:
    async def run() -> None:
        token = await backend.wait_for(KEY, timeout=30)
        queue.put(token.access_token if token else None)

    asyncio.run(run())


async def test_waiting_works_in_a_forked_child_and_still_in_the_parent(tmp_path: Path) -> None:
    holder, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    assert await reader.wait_for(KEY, timeout=0.01) is None  # the watcher runs now
    handle = await holder.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_waits, args=(str(tmp_path), reader, queue))
    child.start()
    parent_wait = asyncio.ensure_future(reader.wait_for(KEY, timeout=30))
    await asyncio.sleep(0.5)
    token = make_token()
    await holder.set_and_release(KEY, token, handle)
    assert await parent_wait == token
    assert await asyncio.to_thread(queue.get, True, 30) == token.access_token
    await asyncio.to_thread(child.join, 30)
    assert child.exitcode == 0
    # The child closed its copy of the watch, not the parent's.
    again = await holder.get_or_lock(KEY, lease=60, refuse=token.access_token)
    assert isinstance(again, LockHandle)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30, refuse=token.access_token))
    await asyncio.sleep(0.1)
    newer = make_token()
    await holder.set_and_release(KEY, newer, again)
    assert await waiting == newer
    await reader.aclose()


async def test_without_inotify_the_wait_polls_and_still_sees_a_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_file_watch, "_inotify", lambda: None)
    holder, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await holder.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    hops = _count_hops(reader)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30, poll=0.01))
    await asyncio.sleep(0.2)
    assert hops[0] >= 2  # it polls on the pool
    token = make_token()
    await holder.set_and_release(KEY, token, handle)
    assert await waiting == token
    handle = await holder.get_or_lock(KEY, lease=60, refuse=token.access_token)
    assert isinstance(handle, LockHandle)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30, refuse=token.access_token))
    await asyncio.sleep(0.05)
    await holder.release_lock(handle)
    assert await waiting is None


async def test_a_failed_watcher_thread_ends_its_waits_and_the_next_wait_starts_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, reader = FileBackend(tmp_path), FileBackend(tmp_path)
    handle = await holder.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    real = _file_watch.DirWatcher._drain

    def broken(*args: Any) -> set[str]:
        raise OSError("the inotify descriptor went bad")

    monkeypatch.setattr(_file_watch.DirWatcher, "_drain", broken)
    assert await reader.wait_for(KEY, timeout=60) is None  # not after 60 s: at once
    assert reader._watcher._fd == -1
    monkeypatch.setattr(_file_watch.DirWatcher, "_drain", real)
    waiting = asyncio.ensure_future(reader.wait_for(KEY, timeout=30))
    await asyncio.sleep(0.1)
    token = make_token()
    await holder.set_and_release(KEY, token, handle)
    assert await waiting == token
    await reader.aclose()


async def test_the_back_off_read_with_the_lock_answers_the_next_get_backoff(
    tmp_path: Path,
) -> None:
    other, backend = FileBackend(tmp_path), FileBackend(tmp_path)
    retry_at = time.time() + 30
    await other.set_backoff(KEY, retry_at)
    hops = _count_hops(backend)
    handle = await backend.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    assert await backend.get_backoff(KEY) == retry_at
    assert hops[0] == 1  # the cold path's second step needed no hop of its own
    assert await backend.get_backoff(KEY) == retry_at  # the memo is used once
    assert hops[0] == 2
    await backend.release_lock(handle)
    # A back-off written after the lock was taken is not hidden by the memo.
    handle = await backend.get_or_lock(KEY, lease=60)
    assert isinstance(handle, LockHandle)
    later = time.time() + 60
    await backend.set_backoff(KEY, later)
    assert await backend.get_backoff(KEY) == later
    await backend.release_lock(handle)
    await other.aclose()
    await backend.aclose()
