"""An aiohttp client middleware that authorizes Commerce Layer API requests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import hdrs
from aiohttp.payload import Payload

from ._api_auth import ApiAuthorizer

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = ["TokenMiddleware"]


class TokenMiddleware:
    """An aiohttp (>= 3.12) client middleware that adds the manager's token.

    Use ``aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()])``.

    Each request to a Commerce Layer host (see ``_api_auth.TokenDestinations``) gets
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
        self,
        manager: TokenManager,
        *,
        scope: str | None = None,
        hosts: Iterable[str] = (),
        customer: str | None = None,
    ) -> None:
        self._auth = ApiAuthorizer(manager, scope=scope, hosts=hosts, customer=customer)

    def __repr__(self) -> str:
        return f"TokenMiddleware(manager={self._auth.manager!r}, scope={self._auth.scope!r})"

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Send ``request`` with the token; on a 401, once more with a fresh one.

        Args:
            request: the request aiohttp is about to send.
            handler: the next middleware, or the sender of the request.
        """
        has_authorization = hdrs.AUTHORIZATION in request.headers
        if not self._auth.should_authorize(str(request.url), has_authorization=has_authorization):
            return await handler(request)
        sent = await self._auth.token()
        request.headers[hdrs.AUTHORIZATION] = sent.authorization
        response = await handler(request)
        if response.status != 401:
            return response
        # Read the small error body now: that gives the connection back to the pool
        # before waiting for a new token, and keeps the body readable if returned.
        await response.read()
        fresh = await self._auth.after_401(sent, replayable=not _consumed(request))
        if fresh is None:
            return response
        request.headers[hdrs.AUTHORIZATION] = fresh.authorization
        # The next handler, not this middleware: the retry cannot retry again.
        return await handler(request)


def _consumed(request: aiohttp.ClientRequest) -> bool:
    """Whether the request's body was a one-shot stream that cannot be sent again."""
    body = request.body
    return isinstance(body, Payload) and body.consumed
