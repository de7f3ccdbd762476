"""The HTTP exchange with an OAuth2 token endpoint: one request, one validated answer."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from ._clock import Clock
from ._errors import AuthenticationError, ConfigurationError, TokenEndpointError
from ._retry import parse_retry_after
from ._token import Token

__all__ = ["BodyEncoding", "TokenEndpoint", "auth_url_problem"]

logger = logging.getLogger("cl_tokens")

BodyEncoding = Literal["json", "form"]
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REJECTED_STATUSES = frozenset({400, 401, 403})
_MAX_BODY = 256 * 1024


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_url_problem(url: object) -> str | None:
    """Why ``url`` cannot be a token endpoint, or None when it can.

    It must be https; plain http is allowed only to a loopback host, for local tests.
    """
    if not isinstance(url, str) or not url:
        return "must be a URL such as https://auth.commercelayer.io/oauth/token"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an https URL, not {url!r}"
    if parts.username or parts.password:
        return "must not carry credentials in the URL"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return "must use https (plain http is allowed only to 127.0.0.1, ::1 or localhost)"
    return None


class TokenEndpoint:
    """Sends one client_credentials request and turns the answer into a Token or an error."""

    def __init__(
        self,
        *,
        auth_url: str,
        client_id: str,
        client_secret: str | None,
        body_encoding: BodyEncoding,
        clock: Clock,
        session: Callable[[], Awaitable[aiohttp.ClientSession]],
        user_agent: str,
    ) -> None:
        problem = auth_url_problem(auth_url)
        if problem:
            raise ConfigurationError(f"auth_url {problem}")
        self.auth_url = auth_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._body_encoding = body_encoding
        self._clock = clock
        self._session = session
        self._headers = {"Accept": "application/json", "User-Agent": user_agent}

    def body(self, scope: str | None) -> dict[str, str]:
        """The request body: Commerce Layer's documented shape."""
        body = {"grant_type": "client_credentials", "client_id": self._client_id}
        if self._client_secret is not None:
            body["client_secret"] = self._client_secret
        if scope is not None:
            body["scope"] = scope
        return body

    def redact(self, text: str) -> str:
        """``text`` with any echo of the client secret removed."""
        if self._client_secret and len(self._client_secret) >= 4:
            text = text.replace(self._client_secret, "***")
        return text

    async def request(self, scope: str | None, timeout: float) -> Token:
        """One POST to the token endpoint, answered within ``timeout`` seconds."""
        session = await self._session()
        body = self.body(scope)
        payload: dict[str, Any] = (
            {"json": body} if self._body_encoding == "json" else {"data": body}
        )
        sent_at = self._clock.time()
        try:
            async with session.post(
                self.auth_url,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
                **payload,
            ) as response:
                raw = await response.content.read(_MAX_BODY)
                status = response.status
                content_type = response.content_type
                retry_after_header = response.headers.get("Retry-After")
        except asyncio.TimeoutError:
            raise TokenEndpointError(
                f"token endpoint did not answer within {timeout:g} s", retryable=True
            ) from None
        except aiohttp.ClientError as exc:
            raise TokenEndpointError(
                f"token endpoint unreachable: {type(exc).__name__}: {self.redact(str(exc))}",
                retryable=True,
            ) from None
        if status == 200:
            return self._token_from(raw, scope, sent_at)
        self._raise_for(status, content_type, raw, retry_after_header)
        raise AssertionError("unreachable")  # pragma: no cover

    def _token_from(self, raw: bytes, scope: str | None, sent_at: float) -> Token:
        def malformed(why: str) -> TokenEndpointError:
            return TokenEndpointError(
                f"token endpoint sent a malformed response: {why}", status=200
            )

        try:
            data = json.loads(raw)
        except ValueError:
            raise malformed("the body is not JSON") from None
        if not isinstance(data, dict):
            raise malformed("the body is not a JSON object")
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token.strip():
            raise malformed("access_token is missing or empty")
        expires_in = _number(data.get("expires_in"))
        if expires_in is None or expires_in <= 0:
            raise malformed("expires_in is missing or not a positive number")
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or not token_type:
            raise malformed("token_type is not a string")
        granted = data.get("scope")
        return Token(
            access_token=access_token,
            token_type=token_type,
            scope=granted if isinstance(granted, str) and granted else scope,
            expires_at=sent_at + expires_in,
            created_at=_number(data.get("created_at")),
            lifetime=expires_in,
        )

    def _raise_for(
        self, status: int, content_type: str, raw: bytes, retry_after_header: str | None
    ) -> None:
        data: Any = None
        if "json" in content_type or raw[:1] in (b"{", b"["):
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
        if status in REJECTED_STATUSES:
            code, title, detail = _error_fields(data)
            detail = self.redact(detail) if detail else None
            summary = " ".join(p for p in (code, title) if p)
            message = f"token request rejected (HTTP {status}{': ' + summary if summary else ''})"
            if detail:
                message += f": {detail}"
            raise AuthenticationError(message, status=status, code=code, title=title, detail=detail)
        retry_after = parse_retry_after(retry_after_header, self._clock.time())
        kind = "JSON" if data is not None else (content_type or "empty")
        message = f"token endpoint answered HTTP {status} ({kind} body)"
        if data is not None:
            code, title, detail = _error_fields(data)
            said = "; ".join(p for p in (code, title, detail) if p)
            if said:
                message += f": {self.redact(said)}"
        raise TokenEndpointError(
            message,
            status=status,
            retry_after=retry_after,
            retryable=status in RETRYABLE_STATUSES,
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and str(value) else None


def _error_fields(data: Any) -> tuple[str | None, str | None, str | None]:
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
