"""An aiohttp client middleware that authorizes Commerce Layer API requests.

It also holds ``TokenDestinations``, the rule both integrations (this one and the
httpx ``Auth``) follow to decide which URLs may receive the token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
from aiohttp import hdrs
from aiohttp.payload import Payload

from ._endpoint import auth_url_problem
from ._errors import ConfigurationError
from ._token import Token

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = ["TokenDestinations", "TokenMiddleware"]

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


class TokenMiddleware:
    """An aiohttp (>= 3.12) client middleware that adds the manager's token.

    Use ``aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()])``.

    Each request to a Commerce Layer host (see ``TokenDestinations``) gets
    ``Authorization: Bearer <token>``. On every 401 it invalidates exactly the token it
    sent (a hundred requests that saw the same stale token cause one new token request,
    and a token someone already replaced is left alone) and sends the request again,
    once, with the fresh token. A second 401 is returned to the caller as is; so is the
    first when no different token can be had or the request body cannot be sent again
    (a streamed upload: the rejected token is still invalidated, so the caller's own
    retry gets a fresh one).

    Left untouched, without retry: a request that already has an ``Authorization``
    header (the caller's explicit choice wins), a request to another host, and the
    manager's own requests to its token endpoint.

    Args:
        manager: the ``TokenManager`` that provides the tokens.
        scope: the scope of the tokens; None for the manager's default.
        hosts: extra host names that may receive the token (``*.example.com`` for a
            domain's subdomains), e.g. a proxy in front of the API.

    Raises:
        ConfigurationError: a host is not a plain host name.

    A request that needs a token raises the manager's ``TokenError`` (e.g.
    ``AuthenticationError``) from ``session.get(...)`` when none can be had; the
    request is then not sent.
    """

    def __init__(
        self, manager: TokenManager, *, scope: str | None = None, hosts: Iterable[str] = ()
    ) -> None:
        self._manager = manager
        self._scope = scope
        self._destinations = TokenDestinations(manager.auth_url, hosts)

    def __repr__(self) -> str:
        return f"TokenMiddleware(manager={self._manager!r}, scope={self._scope!r})"

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Send ``request`` with the token; on a 401, once more with a fresh one.

        Args:
            request: the request aiohttp is about to send.
            handler: the next middleware, or the sender of the request.
        """
        url = str(request.url)
        if (
            _getting_token.get()
            or hdrs.AUTHORIZATION in request.headers
            or self._destinations.is_token_endpoint(url)
            or not self._destinations.allows(url)
        ):
            return await handler(request)
        sent = await self._token()
        request.headers[hdrs.AUTHORIZATION] = sent.authorization
        response = await handler(request)
        if response.status != 401:
            return response
        # Read the small error body now: that gives the connection back to the pool
        # before waiting for a new token, and keeps the body readable if returned.
        await response.read()
        # Every 401 drops the token it refused, retried or not: left cached, it would
        # be handed out (and refused) again until it expired.
        await self._manager.invalidate(sent.access_token, self._scope)
        if _consumed(request):
            return response  # a streamed upload cannot be sent again
        fresh = await self._token()
        if fresh.access_token == sent.access_token:
            return response  # the same token would only be refused again
        request.headers[hdrs.AUTHORIZATION] = fresh.authorization
        # The next handler, not this middleware: the retry cannot retry again.
        return await handler(request)

    async def _token(self) -> Token:
        reset = _getting_token.set(True)
        try:
            return await self._manager.token(self._scope)
        finally:
            _getting_token.reset(reset)


def _consumed(request: aiohttp.ClientRequest) -> bool:
    """Whether the request's body was a one-shot stream that cannot be sent again."""
    body = request.body
    return isinstance(body, Payload) and body.consumed


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    scheme = scheme.lower()
    return scheme, (host or "").lower().rstrip("."), port or _DEFAULT_PORTS.get(scheme)
