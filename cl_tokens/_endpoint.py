"""The HTTP exchange with an OAuth2 token endpoint: one request, one validated answer."""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from ._clock import Clock
from ._errors import ConfigurationError, TokenEndpointError
from ._grants import CLIENT_CREDENTIALS, Grant
from ._http import Answer, error_for, loads_json, oversized_error, post, redactor
from ._metrics import metrics
from ._token import Token
from .backends._base import split_userinfo

__all__ = [
    "MAX_EXPIRES_IN",
    "MIN_EXPIRES_IN",
    "BodyEncoding",
    "TokenEndpoint",
    "auth_url_problem",
]

#: The range of ``expires_in`` accepted from the endpoint: 1 s to 1 year. Commerce
#: Layer issues 2 h (integration) to 4 h tokens; anything outside this range is a
#: broken server, and a huge value would overflow the stores' TTLs.
MIN_EXPIRES_IN = 1.0
MAX_EXPIRES_IN = 365 * 24 * 3600.0
#: Longer than any scope Commerce Layer grants (a list of market and stock-location ids).
MAX_SCOPE_LENGTH = 4096

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
    The reason never quotes the URL: a value in the wrong variable may be a secret,
    and a URL with userinfo carries one.
    """
    if not isinstance(url, str) or not url:
        return "must be a URL such as https://auth.commercelayer.io/oauth/token"
    try:
        scheme, userinfo, rest = split_userinfo(url)
    except ValueError:
        return "must be an https URL such as https://auth.commercelayer.io/oauth/token"
    if userinfo is not None:
        # Checked first: everything up to the last "@" may be a credential, whatever it
        # holds ("/", "#", "?" included), and none of it belongs in a token URL.
        return "must not carry credentials in the URL (nothing before an @)"
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "is not a valid URL (its host or port does not parse)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = f"{parts.scheme}://" if len(parts.scheme) <= 16 else "another scheme"
        return f"must be an https URL with a host, not {shown}"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return "must use https (plain http is allowed only to 127.0.0.1, ::1 or localhost)"
    return None


#: Commerce Layer's refresh tokens live two weeks; the answer does not say so.
REFRESH_TOKEN_LIFETIME = 14 * 24 * 3600.0


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
        self._granted: str | None = None  # the scope the last answer granted
        self._lifetime = 0.0  # the expires_in the last answer gave

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

    async def request(
        self, scope: str | None, timeout: float, grant: Grant = CLIENT_CREDENTIALS
    ) -> Token:
        """One POST to the token endpoint, answered within ``timeout`` seconds."""
        sent_at = self._clock.time()
        redact = self.redact if not grant.fields else redactor(self._client_secret, *grant.secrets)
        try:
            answer = await post(
                await self._session(),
                self.auth_url,
                body=grant.body(self._client_id, self._client_secret, scope),
                form=self._body_encoding == "form",
                headers=self._headers,
                timeout=timeout,
                what="token endpoint",
                redact=redact,
            )
        except TokenEndpointError:
            metrics.token_request(grant.label, "error")
            raise
        status = answer.status
        outcome = (
            "ok"
            if status == 200
            else "rate_limited"
            if status == 429
            else "rejected"
            if status in (400, 401, 403)
            else "error"
        )
        metrics.token_request(grant.label, outcome)
        if answer.status == 200:
            return self._token_from(answer, scope, sent_at, grant)
        raise error_for(
            answer,
            what="token endpoint",
            action="token request" if not grant.fields else f"{grant.label} token request",
            redact=redact,
            now=self._clock.time(),
        )

    def _token_from(
        self, answer: Answer, scope: str | None, sent_at: float, grant: Grant = CLIENT_CREDENTIALS
    ) -> Token:
        """The token in a 200 answer; a malformed one is a TokenEndpointError (not
        retried: a server bug, not a transient fault) that names the fault and never
        quotes a value."""

        def malformed(why: str) -> TokenEndpointError:
            return TokenEndpointError(
                f"token endpoint sent a malformed response: {why}", status=200
            )

        if answer.oversized:
            raise oversized_error("token endpoint", 200)
        try:
            data = loads_json(answer.body)
        except ValueError as exc:
            raise malformed(f"the body is {exc}") from None
        if not isinstance(data, dict):
            raise malformed("the body is not a JSON object")
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token.strip():
            raise malformed("access_token is missing or empty")
        expires_in = _number(data.get("expires_in"))
        if expires_in is None or not MIN_EXPIRES_IN <= expires_in <= MAX_EXPIRES_IN:
            raise malformed(
                f"expires_in is missing or not a number of seconds in [{MIN_EXPIRES_IN:g}, "
                f"{MAX_EXPIRES_IN:g}] (1 s to 1 year)"
            )
        if expires_in == self._lifetime:
            expires_in = self._lifetime  # one float for the lifetime every answer gives
        else:
            self._lifetime = expires_in
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or not token_type:
            raise malformed("token_type is not a string")
        granted = data.get("scope")
        if not isinstance(granted, str) or not granted or granted == scope:
            # The requested scope's own string, which the cache keys already hold.
            granted = scope
        elif granted == self._granted:
            # The scope the last answer granted: customers logged in without a scope
            # all get the same one, kept once rather than once per customer.
            granted = self._granted
        elif len(granted) > MAX_SCOPE_LENGTH or not granted.isprintable():
            raise malformed(
                f"scope is longer than {MAX_SCOPE_LENGTH} characters or has control characters"
            )
        else:
            self._granted = granted
        refresh = data.get("refresh_token") if grant is not CLIENT_CREDENTIALS else None
        owner_id = data.get("owner_id") if grant is not CLIENT_CREDENTIALS else None
        if owner_id is not None and not isinstance(owner_id, str):
            owner_id = str(owner_id) if isinstance(owner_id, int) else None
        owner_type = data.get("owner_type") if owner_id is not None else None
        try:
            return Token(
                access_token=access_token,
                token_type=token_type,
                scope=granted,
                expires_at=sent_at + expires_in,
                created_at=_number(data.get("created_at")),
                lifetime=expires_in,
                refresh_token=refresh if refresh else None,
                refresh_expires_at=sent_at + REFRESH_TOKEN_LIFETIME if refresh else None,
                owner_id=owner_id,
                owner_type=owner_type if isinstance(owner_type, str) and owner_type else None,
            )
        except ValueError as exc:
            # token_value_problem's reason: it names the field, never the value.
            raise malformed(str(exc)) from None


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (a bool, text that is no number, NaN, or an
    integer too large for a float)."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            value = float(value) if len(value) <= 64 else None
        if isinstance(value, (int, float)):
            number = float(value)
            return number if math.isfinite(number) else None
    except (ValueError, OverflowError):
        return None
    return None
