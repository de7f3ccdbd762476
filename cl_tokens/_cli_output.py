"""What ``cl-tokens`` writes on stderr: the log, filtered for scripts, and a status line.

Without flags the log shows the warnings that change the outcome (the shared cache
failed, a lock wait ran out, a back-off is in force), one line each, and never twice;
the warning that repeats the final error line (rejected credentials) is left to that
line. ``--verbose`` adds the library's info lines, ``--debug`` everything.

On a terminal, a command still waiting for its token after 2 s shows one status line,
rewritten in place and erased when the wait ends: ``waiting for auth.commercelayer.io:
attempt 2 of 3, next in 1.4 s``. The attempt numbers come from the retry loop's own
log records, so the library needs no hook for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

__all__ = ["StatusLine", "configure_logging"]

T = TypeVar("T")

STATUS_AFTER = 2.0  # seconds of waiting before the status line appears
_TICK = 0.2
_LIBRARY = "cl_tokens"
# Warnings whose content the final error line already gives (see _manager.TokenManager).
_SAID_BY_THE_ERROR_LINE = ("token request for client %r rejected",)
# The retry loop's record for a failed attempt (see _retry.with_retries); its arguments
# are (number, attempts, error, delay).
_RETRY_RECORD = "token request attempt %d of %d failed"


class StatusLine:
    """One line on a terminal's stderr about a wait for the token endpoint.

    Args:
        stream: where to write; a stream that is not a terminal gets nothing.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self.enabled = stream.isatty()
        except (AttributeError, ValueError, OSError):
            self.enabled = False
        self.target = "the token endpoint"
        self.attempts: int | None = None
        self._attempt = 1
        self._next_at: float | None = None
        self._started = time.monotonic()
        self._width = 0
        self._stopped = False

    def set_endpoint(self, auth_url: str, attempts: int) -> None:
        """Name the endpoint being waited for (its host) and the attempts a fetch makes."""
        try:
            host = urlsplit(auth_url).hostname
        except ValueError:
            host = None
        self.target = host or self.target
        self.attempts = attempts

    def attempt_failed(self, number: int, attempts: int, delay: float) -> None:
        """Attempt ``number`` failed; attempt ``number + 1`` starts in ``delay`` s."""
        self._attempt = number + 1
        self.attempts = attempts
        self._next_at = time.monotonic() + delay

    def text(self) -> str:
        """The status as it reads now."""
        now = time.monotonic()
        waited = now - self._started
        if self._attempt == 1 or self.attempts is None:
            return f"waiting for a token from {self.target} ({waited:.0f} s)"
        where = f"waiting for {self.target}: attempt {self._attempt} of {self.attempts}"
        if self._next_at is not None and self._next_at > now:
            return f"{where}, next in {self._next_at - now:.1f} s"
        return f"{where} ({waited:.0f} s)"

    def stop(self) -> None:
        """The wait is over: erase the line and show it no more (call before output)."""
        self._stopped = True
        self.clear()

    def show(self) -> None:
        if not self.enabled or self._stopped:
            return
        text = self.text()
        self._width = max(self._width, len(text))
        self._write("\r" + text.ljust(self._width))

    def clear(self) -> None:
        """Erase the line, so what follows (a warning, the error) starts a clean line."""
        if self.enabled and self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
            self._stream.flush()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work``, showing the status from ``STATUS_AFTER`` s until it ends."""
        self._started = time.monotonic()
        if not self.enabled:
            return await work

        async def tick() -> None:
            await asyncio.sleep(STATUS_AFTER)
            while True:
                self.show()
                await asyncio.sleep(_TICK)

        ticker = asyncio.create_task(tick())
        try:
            return await work
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.stop()


class _StatusRecords(logging.Handler):
    """Feeds the retry loop's "attempt failed" records to the status line."""

    def __init__(self, status: StatusLine) -> None:
        super().__init__(logging.INFO)
        self._status = status

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(_RETRY_RECORD)
            and isinstance(args, tuple)
            and len(args) == 4
        ):
            number, attempts, _, delay = args
            if (
                isinstance(number, int)
                and isinstance(attempts, int)
                and isinstance(delay, (int, float))
            ):
                self._status.attempt_failed(number, attempts, float(delay))


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """The log on stderr: erases the status line first; shows a message once."""

    def __init__(self, stream: TextIO, status: StatusLine, quiet: bool) -> None:
        super().__init__(stream)
        self._status = status
        self._quiet = quiet
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self._quiet:
            if record.levelno < logging.ERROR and (
                (isinstance(record.msg, str) and record.msg.startswith(_SAID_BY_THE_ERROR_LINE))
                or not (record.name == _LIBRARY or record.name.startswith(_LIBRARY + "."))
            ):
                return False  # other libraries' warnings: with --verbose
            message = record.getMessage()
            if message in self._seen:
                return False  # e.g. the same warning from each of the demo's workers
            self._seen.add(message)
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        self._status.clear()
        super().emit(record)


def configure_logging(
    verbose: bool, debug: bool, stream: TextIO, status: StatusLine | None = None
) -> StatusLine:
    """Send the log to ``stream`` as ``cl-tokens`` shows it; return the status line.

    Args:
        verbose: add the library's info lines.
        debug: add everything.
        stream: stderr.
        status: the status line to feed (default: a new one on ``stream``).
    """
    status = status if status is not None else StatusLine(stream)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = _Stderr(stream, status, quiet=not (verbose or debug))
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("cl-tokens: %(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    library = logging.getLogger(_LIBRARY)
    for old in library.handlers[:]:
        if isinstance(old, _StatusRecords):
            library.removeHandler(old)
    # INFO at least, so the retry records reach the status line; the stderr handler's
    # own level still decides what is shown.
    library.setLevel(min(level, logging.INFO))
    library.addHandler(_StatusRecords(status))
    return status
