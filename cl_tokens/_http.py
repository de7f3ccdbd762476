"""One POST to an OAuth2 endpoint and the mapping of its failures to our errors.

Shared by the token request and the revocation: both send credentials, so both refuse
redirects, bound the body they read, and keep the secret out of every message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp

from ._errors import AuthenticationError, TokenEndpointError
from ._retry import parse_retry_after

__all__ = ["RETRYABLE_STATUSES", "Answer", "error_fields", "error_for", "post", "redactor"]

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REJECTED_STATUSES = frozenset({400, 401, 403})
_MAX_BODY = 256 * 1024


def redactor(*secrets: str | None) -> Callable[[str], str]:
    """A function that replaces every echo of ``secrets`` in a text by ``***``.

    A server that echoes the request echoes it as it was sent: verbatim, JSON-escaped,
    or form-encoded (``+``, ``%2B``...). Each form is removed; secrets shorter than 4
    characters are left alone (they would blank out ordinary words).
    """
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= 4:
            forms.update(
                (
                    secret,
                    json.dumps(secret)[1:-1],
                    quote_plus(secret),
                    quote_plus(secret, safe="/"),
                    quote(secret, safe=""),
                    quote(secret),
                )
            )
    ordered = sorted(forms, key=len, reverse=True)  # longest first: no partial leftovers

    def redact(text: str) -> str:
        for form in ordered:
            text = text.replace(form, "***")
        return text

    return redact


@dataclass(frozen=True, slots=True)
class Answer:
    """What an endpoint answered: status, content type, body (bounded), Retry-After."""

    status: int
    content_type: str
    body: bytes
    retry_after: str | None


async def post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    body: Mapping[str, str],
    form: bool,
    headers: Mapping[str, str],
    timeout: float,
    what: str,
    redact: Callable[[str], str],
) -> Answer:
    """POST ``body`` (JSON, or form-encoded with ``form``) and read the answer.

    Raises:
        TokenEndpointError: (retryable) on a timeout or a connection failure; ``what``
            names the endpoint in the message.
    """
    payload: dict[str, Any] = {"data": dict(body)} if form else {"json": dict(body)}
    try:
        async with session.post(
            url,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout),
            # A redirect would carry the credentials wherever the server points.
            allow_redirects=False,
            **payload,
        ) as response:
            return Answer(
                status=response.status,
                content_type=response.content_type,
                body=await response.content.read(_MAX_BODY),
                retry_after=response.headers.get("Retry-After"),
            )
    except asyncio.TimeoutError:
        raise TokenEndpointError(
            f"{what} did not answer within {timeout:g} s", retryable=True
        ) from None
    except aiohttp.ClientError as exc:
        raise TokenEndpointError(
            f"{what} unreachable: {type(exc).__name__}: {redact(str(exc))}", retryable=True
        ) from None


def error_for(
    answer: Answer,
    *,
    what: str,
    action: str,
    redact: Callable[[str], str],
    now: float,
) -> AuthenticationError | TokenEndpointError:
    """The error for a non-success ``answer``.

    400/401/403 are ``AuthenticationError`` ("``action`` rejected"), with Commerce
    Layer's code, title and detail; anything else is ``TokenEndpointError`` ("``what``
    answered HTTP n"), retryable for 408, 429 and 5xx gateway statuses, with the
    server's ``Retry-After``. Whatever the server said passes through ``redact``.
    """
    data: Any = None
    if "json" in answer.content_type or answer.body[:1] in (b"{", b"["):
        try:
            data = json.loads(answer.body)
        except ValueError:
            data = None
    code, title, detail = (redact(part) if part else None for part in error_fields(data))
    status = answer.status
    if status in REJECTED_STATUSES:
        summary = " ".join(p for p in (code, title) if p)
        message = f"{action} rejected (HTTP {status}{': ' + summary if summary else ''})"
        if detail:
            message += f": {detail}"
        return AuthenticationError(message, status=status, code=code, title=title, detail=detail)
    kind = "JSON" if data is not None else (answer.content_type or "empty")
    message = f"{what} answered HTTP {status} ({kind} body)"
    said = "; ".join(p for p in (code, title, detail) if p)
    if said:
        message += f": {said}"
    return TokenEndpointError(
        message,
        status=status,
        retry_after=parse_retry_after(answer.retry_after, now),
        retryable=status in RETRYABLE_STATUSES,
    )


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and str(value) else None


def error_fields(data: Any) -> tuple[str | None, str | None, str | None]:
    """(code, title, detail) from Commerce Layer's ``errors`` (array or object) or RFC 6749."""
    if not isinstance(data, dict):
        return None, None, None
    errors = data.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        errors = errors[0]
    if isinstance(errors, dict):
        return _text(errors.get("code")), _text(errors.get("title")), _text(errors.get("detail"))
    if "error" in data:
        return _text(data.get("error")), None, _text(data.get("error_description"))
    return None, None, None
