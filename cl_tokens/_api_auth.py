"""What the aiohttp middleware and the httpx ``Auth`` share, apart from their HTTP
client: which requests may carry the token, and what a 401 from the API means."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ._endpoint import auth_url_problem
from ._errors import ConfigurationError
from ._token import Token

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = ["ApiAuthorizer", "TokenDestinations"]

logger = logging.getLogger("cl_tokens")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CL_DOMAIN = "commercelayer.io"
_MAX_WARNED_HOSTS = 256

# True while the middleware is getting a token: a request made meanwhile (by the flight
# task the manager starts, which inherits this context) is the manager's own and must go
# out untouched, or a manager sharing the middleware's session would wait on itself.
_getting_token: ContextVar[bool] = ContextVar("cl_tokens_getting_token", default=False)


class TokenDestinations:
    """Which URLs may receive the access token.

    A bearer token is as good as the credentials for its lifetime, so it goes only to:
    the token endpoint's origin (which already receives the client secret), https hosts
    under ``commercelayer.io`` and the extra ``hosts`` given; never over plain http
    except to a loopback host. This also keeps the token off a redirect to a foreign
    origin, which aiohttp passes through the middleware again. The decision needs no
    token, so a request to another host never waits for (or fails on) a token fetch.

    Args:
        auth_url: the manager's token endpoint.
        hosts: extra host names allowed to receive the token; ``*.example.com``
            allows every subdomain of ``example.com``.

    Raises:
        ConfigurationError: a host is not a plain host name.
    """

    def __init__(self, auth_url: str, hosts: Iterable[str] = ()) -> None:
        parts = urlsplit(auth_url)
        self._auth_origin = _origin(parts.scheme, parts.hostname, parts.port)
        self._auth_path = parts.path or "/"
        if isinstance(hosts, str):
            raise ConfigurationError("hosts must be a list of host names, not a string")
        exact: set[str] = set()
        suffixes: list[str] = []
        for host in hosts:
            if not isinstance(host, str) or not host or "/" in host or ":" in host:
                raise ConfigurationError(
                    f"hosts must be host names such as 'api.example.com', not {host!r}"
                )
            host = host.lower().rstrip(".")
            if host.startswith("*."):
                suffixes.append(host[1:])
            else:
                exact.add(host)
        self._exact = frozenset(exact)
        self._suffixes = (f".{_CL_DOMAIN}", *suffixes)
        self._warned: set[str] = set()

    def is_token_endpoint(self, url: str) -> bool:
        """Whether ``url`` is the manager's own token or revocation endpoint."""
        parts = urlsplit(url)
        if _origin(parts.scheme, parts.hostname, parts.port) != self._auth_origin:
            return False
        return parts.path == self._auth_path or parts.path.startswith("/oauth/")

    def allows(self, url: str) -> bool:
        """Whether ``url`` may receive the token (warns once per refused host)."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
        if not host:
            return False
        if _origin(scheme, host, parts.port) == self._auth_origin:
            return True
        # The same rule as the token endpoint: https, or plain http to loopback only.
        if auth_url_problem(url) is None and (
            host in self._exact or host == _CL_DOMAIN or host.endswith(self._suffixes)
        ):
            return True
        if host not in self._warned and len(self._warned) < _MAX_WARNED_HOSTS:
            self._warned.add(host)
            logger.warning(
                "not sending the Commerce Layer token to %s://%s: not a Commerce Layer host "
                "(or not https); allow it with hosts=[...]",
                scheme,
                host,
            )
        return False


class ApiAuthorizer:
    """The token side of an API request, whatever client sends it.

    Args:
        manager: the ``TokenManager`` that provides the tokens.
        scope: the scope of the tokens; None for the manager's default.
        hosts: extra host names that may receive the token (see ``TokenDestinations``).
        customer: a customer's ``owner_id``: send their token, not the app's.
    """

    def __init__(
        self,
        manager: TokenManager,
        *,
        scope: str | None,
        hosts: Iterable[str],
        customer: str | None = None,
    ) -> None:
        self.manager = manager
        self.scope = scope
        self.customer = customer
        self._destinations = TokenDestinations(manager.auth_url, hosts)

    def should_authorize(self, url: str, *, has_authorization: bool) -> bool:
        """Whether a request to ``url`` gets the token.

        Not: the manager's own token requests, a request whose caller set its own
        ``Authorization``, a request to a host that may not receive the token.
        """
        return not (
            _getting_token.get()
            or has_authorization
            or self._destinations.is_token_endpoint(url)
            or not self._destinations.allows(url)
        )

    async def token(self) -> Token:
        reset = _getting_token.set(True)
        try:
            return await self.manager.token(self.scope, customer=self.customer)
        finally:
            _getting_token.reset(reset)

    async def after_401(self, sent: Token, *, replayable: bool) -> Token | None:
        """The token to send the refused request again with, or None for no retry.

        Every 401 drops the token it refused, retried or not: left cached, it would be
        handed out (and refused) again until it expired. No retry for a body that
        cannot be sent again, nor when the same token would only be refused again.
        """
        await self.manager.invalidate(sent.access_token, self.scope, customer=self.customer)
        if not replayable:
            return None
        fresh = await self.token()
        return None if fresh.access_token == sent.access_token else fresh


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    scheme = scheme.lower()
    return scheme, (host or "").lower().rstrip("."), port or _DEFAULT_PORTS.get(scheme)
