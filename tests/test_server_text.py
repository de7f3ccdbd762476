"""Server text cannot forge log lines or flood them: escaped and cut short everywhere."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cl_tokens import AuthenticationError, TokenEndpointError, TokenManager
from cl_tokens._http import MAX_QUOTED, safe_text
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"
FORGED = "\n2026-01-01 00:00:00 CRITICAL cl_tokens: token leaked, call +1-555-0100\x1b[2J"


async def test_a_60_kb_hostile_401_detail_is_one_bounded_escaped_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attacker controls the token endpoint's error body; they must not get forged
    log lines, terminal escapes or a 60 KB record into the application's logs."""
    unit = "\x1b[31mERROR\x1b[0m" + FORGED + "\r\n" + "padding " * 50
    detail = unit * (60_001 // len(unit) + 1)
    assert len(detail) > 60_000
    body = {
        "errors": [{"code": "UNAUTHORIZED\n", "title": "invalid\x1b]0;pwned\x07", "detail": detail}]
    }
    assert len(json.dumps(body)) < 64 * 1024  # under the cap: read and quoted
    caplog.set_level(logging.DEBUG, logger="cl_tokens")
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.fail_next(1, 401, body=json.dumps(body), content_type="application/json")
        async with TokenManager(
            server.client_id, SECRET, auth_url=server.url, attempts=3
        ) as manager:
            with pytest.raises(AuthenticationError) as info:
                await manager.header()
    records = [r for r in caplog.records if r.name == "cl_tokens" and "rejected" in r.getMessage()]
    assert len(records) == 1
    line = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(records[0])
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "\x07" not in line
    assert len(line) < 1200
    assert "\\x1b[31mERROR" in line  # escaped, as repr writes it: still readable
    assert "\\n2026-01-01" in line
    error = info.value
    for text in (str(error), error.code, error.title, error.detail):
        assert text is not None
        assert text.isprintable()
        assert len(text) < 1000
    assert error.status == 401
    assert error.code == "UNAUTHORIZED\\n"


async def test_a_hostile_5xx_body_is_escaped_in_the_error_and_the_retry_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cl_tokens")
    body = json.dumps({"error": "down" + FORGED * 100, "error_description": FORGED * 100})
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.fail_next(2, 503, body=body, content_type="application/json")
        async with TokenManager(
            server.client_id, SECRET, auth_url=server.url, attempts=2, backoff_base=0.01
        ) as manager:
            with pytest.raises(TokenEndpointError) as info:
                await manager.header()
    assert str(info.value).isprintable()
    assert len(str(info.value)) < 1000
    for record in caplog.records:
        message = record.getMessage()
        assert message.isprintable(), message
        assert len(message) < 1500


@given(st.text())
def test_safe_text_is_one_printable_bounded_line(text: str) -> None:
    shown = safe_text(text)
    assert shown.isprintable()
    assert len(shown) <= MAX_QUOTED + 40
    if text.isprintable() and "\\" not in text and len(text) <= MAX_QUOTED:
        assert shown == text  # ordinary text is left alone
