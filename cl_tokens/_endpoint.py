"""The HTTP exchange with an OAuth2 token endpoint: one request, one validated answer."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from ._clock import Clock
from ._errors import ConfigurationError, TokenEndpointError
from ._http import error_for, post, redactor
from ._token import Token

__all__ = ["BodyEncoding", "TokenEndpoint", "auth_url_problem"]

logger = logging.getLogger("cl_tokens")

BodyEncoding = Literal["json", "form"]


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
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.username or parts.password:
        # Checked first, and the URL not echoed: it carries a credential.
        return "must not carry credentials in the URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an https URL, not {url!r}"
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
        self._redact = redactor(client_secret)
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
        """``text`` with any echo of the client secret removed, in any encoding."""
        return self._redact(text)

    async def request(self, scope: str | None, timeout: float) -> Token:
        """One POST to the token endpoint, answered within ``timeout`` seconds."""
        sent_at = self._clock.time()
        answer = await post(
            await self._session(),
            self.auth_url,
            body=self.body(scope),
            form=self._body_encoding == "form",
            headers=self._headers,
            timeout=timeout,
            what="token endpoint",
            redact=self.redact,
        )
        if answer.status == 200:
            return self._token_from(answer.body, scope, sent_at)
        raise error_for(
            answer,
            what="token endpoint",
            action="token request",
            redact=self.redact,
            now=self._clock.time(),
        )

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
