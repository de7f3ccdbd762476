"""The file backend's own daemon threads (issue 11, items 2 and 6).

Busy application threads must never delay a file call (they would make the store look
down, and every process fetch its own token), and a file call that never returns must
never keep the process alive.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio.to_thread
import pytest
from backend_contract import make_token
from test_cli import cl_tokens, clean_env, stored_tokens

from cl_tokens import BackendError
from cl_tokens._shared import within
from cl_tokens._tuning import Tuning
from cl_tokens.backends import FileBackend, _file
from cl_tokens.backends._daemon_pool import DaemonPool
from cl_tokens.testing import FakeAuthServer

ROOT = Path(__file__).resolve().parent.parent
KEY = "cl_tokens:v2:" + "cd" * 20


async def test_file_calls_run_on_the_backends_own_daemon_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[threading.Thread] = []
    real = _file.read_regular

    def recording(*args: object) -> bytes | None:
        seen.append(threading.current_thread())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_file, "read_regular", recording)
    backend = FileBackend(tmp_path)
    token = make_token()
    await backend.set(KEY, token)
    assert await backend.get(KEY) == token
    (thread,) = seen
    assert thread.daemon
    assert thread.name.startswith("cl_tokens-file-")
    assert thread is not threading.main_thread()


async def test_file_backend_answers_while_every_shared_thread_is_busy(tmp_path: Path) -> None:
    # An app whose sync endpoints hold all of anyio's default threads and all of the
    # loop's default executor: the file backend must not queue behind them.
    release = threading.Event()
    limiter = anyio.to_thread.current_default_thread_limiter()
    blockers = [
        asyncio.ensure_future(anyio.to_thread.run_sync(release.wait))
        for _ in range(int(limiter.total_tokens))
    ]
    loop = asyncio.get_running_loop()
    blockers += [loop.run_in_executor(None, release.wait) for _ in range(64)]
    try:
        for _ in range(500):
            if limiter.borrowed_tokens == limiter.total_tokens:
                break
            await asyncio.sleep(0.01)
        assert limiter.borrowed_tokens == limiter.total_tokens
        backend = FileBackend(tmp_path)
        token = make_token()
        await within(backend.set(KEY, token), 10)
        assert await within(backend.get(KEY), 10) == token
        handle = await within(backend.acquire_lock(KEY, lease=5), 10)
        assert handle is not None
        await backend.release_lock(handle)
        await within(backend.set_backoff(KEY, time.time() + 30), 10)
        assert await within(backend.get_backoff(KEY), 10) is not None
        assert await within(backend.delete(KEY, token.access_token), 10) is True
        assert not release.is_set()  # the shared threads were busy all along
    finally:
        release.set()
        await asyncio.gather(*blockers)


HUNG = textwrap.dedent(
    """
    import asyncio, sys, threading
    from cl_tokens._shared import within
    from cl_tokens.backends import FileBackend, _file

    def hung(*args):
        threading.Event().wait()  # a read on a mount that never answers

    _file.read_regular = hung

    async def main():
        backend = FileBackend(sys.argv[1])
        try:
            await within(backend.get("cl_tokens:v2:k"), 0.2)
        except asyncio.TimeoutError:
            print("gave up", flush=True)

    asyncio.run(main())
    """
)


async def test_a_hung_file_call_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HUNG,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (process.returncode, out, err) == (0, b"gave up\n", b"")
    assert time.monotonic() - started < 10


async def test_cli_exits_with_a_fifo_at_the_token_path(
    server: FakeAuthServer, tmp_path: Path
) -> None:
    env = clean_env(
        CL_CLIENT_ID=server.client_id,
        CL_CLIENT_SECRET=server.client_secret or "",
        CL_AUTH_URL=server.url,
        CL_TOKEN_BACKEND=f"file://{tmp_path}",
    )
    first = await cl_tokens("token", env=env)
    assert first.code == 0, first.stderr
    (stored,) = stored_tokens(tmp_path)  # whatever the key's file name is
    os.unlink(stored)
    os.mkfifo(stored, 0o600)  # no writer will ever come
    run = await cl_tokens("token", env=env, timeout=60)
    assert run.code == 0, run.stderr
    assert run.stdout == server.issued[1] + "\n"
    assert run.seconds < Tuning.backend_timeout + 10
    assert server.token_requests == 2  # the FIFO was a miss, not a token
    assert stored_tokens(tmp_path) == [stored]
    assert stat.S_ISREG(os.stat(stored).st_mode)  # the new token replaced the FIFO


def test_a_forked_child_starts_its_own_threads(tmp_path: Path) -> None:
    # The parent's threads do not exist in the child: a pool that still counted them
    # (an idle thread waiting for work) would queue the child's calls for ever.
    backend = FileBackend(tmp_path)
    token = make_token()
    asyncio.run(backend.set(KEY, token))
    assert backend._threads.threads >= 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            got = asyncio.run(asyncio.wait_for(backend.get(KEY), 5))
            os._exit(0 if got == token else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- the pool on its own ------------------------------------------------------------------


async def test_pool_runs_at_most_max_threads_at_once() -> None:
    pool = DaemonPool("test-pool", max_threads=3, max_stuck=1)
    release = threading.Event()
    guard = threading.Lock()
    running = peak = 0

    def work(n: int) -> int:
        nonlocal running, peak
        with guard:
            running += 1
            peak = max(peak, running)
        release.wait(10)
        with guard:
            running -= 1
        return n

    calls = [asyncio.ensure_future(pool.run(work, n)) for n in range(20)]
    for _ in range(500):
        if peak == 3:
            break
        await asyncio.sleep(0.01)
    assert pool.threads == 3
    release.set()
    assert await asyncio.gather(*calls) == list(range(20))
    assert peak == 3


async def test_pool_drops_a_queued_call_whose_caller_gave_up() -> None:
    pool = DaemonPool("test-pool", max_threads=2, max_stuck=1)
    release = threading.Event()
    ran: list[str] = []
    busy = asyncio.ensure_future(pool.run(release.wait, 10))
    busy2 = asyncio.ensure_future(pool.run(release.wait, 10))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(pool.run(ran.append, "queued"))
    await asyncio.sleep(0.05)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    await asyncio.gather(busy, busy2)
    await pool.run(ran.append, "later")
    assert ran == ["later"]
    assert pool.stuck == 0


async def test_pool_fails_fast_while_abandoned_calls_are_stuck() -> None:
    pool = DaemonPool("test-pool", max_threads=3, max_stuck=2)
    release = threading.Event()
    for _ in range(2):
        with pytest.raises(asyncio.TimeoutError):
            await within(pool.run(release.wait, 10), 0.05)
    await asyncio.sleep(0.01)  # the abandoned calls unwind
    assert pool.stuck == 2
    with pytest.raises(BackendError, match="2 file operations are still blocked") as caught:
        await pool.run(time.time)
    assert isinstance(caught.value.__cause__, TimeoutError)
    release.set()
    for _ in range(500):
        if pool.stuck == 0:
            break
        await asyncio.sleep(0.01)
    assert await pool.run(sum, [1, 2]) == 3


async def test_pool_errors_reach_the_caller() -> None:
    pool = DaemonPool("test-pool")

    def broken() -> None:
        raise OSError(5, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        await pool.run(broken)


async def test_idle_threads_end() -> None:
    pool = DaemonPool("test-pool", idle=0.05)
    await pool.run(time.time)
    for _ in range(500):
        if pool.threads == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.threads == 0
    await pool.run(time.time)  # and come back on demand
    pool.retire_idle()
    for _ in range(500):
        if pool.threads == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.threads == 0


async def test_aclose_ends_the_backends_idle_threads(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    await backend.set(KEY, make_token())
    assert backend._threads.threads >= 1
    await backend.aclose()
    for _ in range(500):
        if backend._threads.threads == 0:
            break
        await asyncio.sleep(0.01)
    assert backend._threads.threads == 0
    assert await backend.get(KEY) is not None  # still usable: threads come back
