"""One POST to an OAuth2 endpoint and the mapping of its failures to our errors.

Shared by the token request and the revocation: both send credentials, so both refuse
redirects, read the whole body up to a cap, and keep the secret out of every message.
Everything a server says that reaches a message or a log passes through ``safe_text``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp

from ._errors import AuthenticationError, ConfigurationError, TokenEndpointError
from ._retry import parse_retry_after

__all__ = [
    "MAX_BODY",
    "MAX_JSON_DEPTH",
    "RETRYABLE_STATUSES",
    "Answer",
    "BodyTooLarge",
    "check_session",
    "error_fields",
    "error_for",
    "loads_json",
    "oversized_error",
    "post",
    "read_body",
    "redactor",
    "safe_text",
]

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REJECTED_STATUSES = frozenset({400, 401, 403})
#: The most any token, error, revocation or JWKS body may hold. A Commerce Layer token
#: response is about 2 KB and a key set smaller still: 64 KB is plenty, and bounds what
#: a hostile or broken server can make us buffer and parse.
MAX_BODY = 64 * 1024
#: Deeper JSON than this is refused. Commerce Layer's bodies nest 3 levels; the bound
#: keeps a hostile body from reaching the parser's recursion limit, here or downstream.
MAX_JSON_DEPTH = 64
#: How many characters of server text a message may quote.
MAX_QUOTED = 200
#: Default headers a caller's session must not carry to the token endpoint.
_FORBIDDEN_SESSION_HEADERS = ("authorization", "cookie", "proxy-authorization")


def safe_text(text: object, limit: int = MAX_QUOTED) -> str:
    """``text`` fit to quote in a message or a log: one line, no control characters,
    at most ``limit`` characters (plus a note of how long it was).

    Every character that is not printable (C0/C1 controls, DEL, line and paragraph
    separators, bidi overrides...) is written as its escape, as ``repr`` would (``\\n``,
    ``\\x1b``, ``\\u202e``), so server text can neither forge log lines nor drive a
    terminal. Backslashes are doubled, so an escape in the output is never ambiguous.
    """
    raw = text if isinstance(text, str) else str(text)
    out: list[str] = []
    size = 0
    for char in raw:
        if char == "\\":
            piece = "\\\\"
        elif char.isprintable():
            piece = char
        else:
            piece = repr(char)[1:-1]
        out.append(piece)
        size += len(piece)
        if size > limit:
            break
    escaped = "".join(out)
    if size > limit:
        return f"{escaped[:limit]}... ({len(raw)} characters in all)"
    return escaped


class _NotANumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotANumber(f"not JSON: {name} is not a number")


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests deeper than ``limit`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def loads_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON: strict (no NaN/Infinity), at most ``max_depth`` deep.

    Raises:
        ValueError: for every kind of bad input (not JSON, not UTF-8, NaN, too deep,
            a number too long to convert), never RecursionError or OverflowError.
    """
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except _NotANumber as exc:
        raise ValueError(str(exc)) from None
    except json.JSONDecodeError as exc:
        # exc.msg is the parser's own fixed text ("Expecting value"), never the input.
        raise ValueError(f"not JSON ({exc.msg} at byte {exc.pos})") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    if _depth_exceeds(data, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return data


class BodyTooLarge(ValueError):
    """A response body was longer than the cap; the message names the cap."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"the response body is larger than the {cap // 1024} KB cap")
        self.cap = cap


async def read_body(response: aiohttp.ClientResponse, cap: int = MAX_BODY) -> bytes:
    """The whole body of ``response``, read until EOF, whatever its framing.

    A body arrives in as many TCP segments or chunks as the network likes; one
    ``read(n)`` returns only what has arrived so far. This reads until EOF.

    Raises:
        BodyTooLarge: the body (or its announced Content-Length) is over ``cap`` bytes;
            reading stops at the cap.
    """
    if response.content_length is not None and response.content_length > cap:
        raise BodyTooLarge(cap)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(cap + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(cap)


def check_session(session: aiohttp.ClientSession) -> None:
    """Refuse a caller's session whose defaults would send other credentials along.

    A session's default ``Authorization`` or ``Cookie`` header (another API's key, a
    user's session cookie), or its default ``auth=``, would go to the token endpoint
    with every request; so would a ``Proxy-Authorization``. The token and revocation
    requests set their own headers, ``raise_for_status=False`` and no middlewares, so
    nothing else of the session changes how an answer is read.

    Raises:
        ConfigurationError: naming the header (never its value).
    """
    headers = getattr(session, "headers", None) or {}
    carried = sorted(name for name in headers if str(name).lower() in _FORBIDDEN_SESSION_HEADERS)
    if getattr(session, "auth", None) is not None:
        carried.append("auth=")
    if carried:
        raise ConfigurationError(
            "the session has default credentials that would be sent to the token "
            f"endpoint ({', '.join(carried)}): pass a session without them, or none"
        )


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
    """What an endpoint answered: status, content type, whole body, Retry-After.

    ``oversized`` says the body was over ``MAX_BODY`` and was not kept (``body`` is
    then empty).
    """

    status: int
    content_type: str
    body: bytes
    retry_after: str | None
    oversized: bool = False


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
    """POST ``body`` (JSON, or form-encoded with ``form``) and read the whole answer.

    The request sets its own headers, ``raise_for_status=False`` and no middlewares,
    whatever the session's defaults (see ``check_session``).

    Raises:
        ConfigurationError: the session carries default credentials (``check_session``).
        TokenEndpointError: (retryable) on a timeout or a connection failure; ``what``
            names the endpoint in the message.
    """
    check_session(session)
    payload: dict[str, Any] = {"data": dict(body)} if form else {"json": dict(body)}
    try:
        async with session.post(
            url,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout),
            # A redirect would carry the credentials wherever the server points.
            allow_redirects=False,
            # A caller's session must not turn a 401 into a ClientResponseError (which
            # loses the code, the cool-down and Retry-After), nor its middlewares (an
            # Authorization-adding one, ours included) touch a credentials request.
            raise_for_status=False,
            middlewares=(),
            **payload,
        ) as response:
            try:
                raw, oversized = await read_body(response), False
            except BodyTooLarge:
                raw, oversized = b"", True
            return Answer(
                status=response.status,
                content_type=response.content_type,
                body=raw,
                retry_after=response.headers.get("Retry-After"),
                oversized=oversized,
            )
    except asyncio.TimeoutError:
        raise TokenEndpointError(
            f"{what} did not answer within {timeout:g} s", retryable=True
        ) from None
    except aiohttp.ClientError as exc:
        raise TokenEndpointError(
            f"{what} unreachable: {type(exc).__name__}: {safe_text(redact(str(exc)))}",
            retryable=True,
        ) from None


def oversized_error(what: str, status: int) -> TokenEndpointError:
    """The error for a success whose body was over the cap: malformed, not retried."""
    return TokenEndpointError(
        f"{what} sent a malformed response: {BodyTooLarge(MAX_BODY)}", status=status
    )


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
    server's ``Retry-After``. Whatever the server said passes through ``redact``, then
    ``safe_text`` (escaped, cut short), in the message and in the attributes alike. A
    body over the cap is not read; the message says so and the status decides.
    """
    data: Any = None
    if "json" in answer.content_type or answer.body[:1] in (b"{", b"["):
        try:
            data = loads_json(answer.body)
        except ValueError:
            data = None
    code, title, detail = (safe_text(redact(part)) if part else None for part in error_fields(data))
    status = answer.status
    unread = ""
    if answer.oversized:
        unread = f" (the body is over the {MAX_BODY // 1024} KB cap, not read)"
    if status in REJECTED_STATUSES:
        summary = " ".join(p for p in (code, title) if p)
        message = f"{action} rejected (HTTP {status}{': ' + summary if summary else ''})"
        if detail:
            message += f": {detail}"
        return AuthenticationError(
            message + unread, status=status, code=code, title=title, detail=detail
        )
    kind = "JSON" if data is not None else (safe_text(answer.content_type, 60) or "empty")
    message = f"{what} answered HTTP {status} ({kind} body)"
    said = "; ".join(p for p in (code, title, detail) if p)
    if said:
        message += f": {said}"
    return TokenEndpointError(
        message + unread,
        status=status,
        retry_after=parse_retry_after(answer.retry_after, now),
        retryable=status in RETRYABLE_STATUSES,
    )


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    try:
        text = str(value)
    except ValueError:  # an int past str()'s digit limit
        return None
    return text or None


def error_fields(data: Any) -> tuple[str | None, str | None, str | None]:
    """(code, title, detail) from Commerce Layer's ``errors`` (array or object) or RFC 6749.

    The values are raw server text: pass them through ``safe_text`` before showing them.
    """
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
