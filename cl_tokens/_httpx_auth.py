"""An ``httpx.Auth`` for ``httpx.AsyncClient`` that authorizes Commerce Layer API requests.

httpx is an optional extra: this module is imported only by ``manager.httpx_auth()``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("TokenAuth needs httpx: pip install 'cl-tokens[httpx]'") from exc

from ._api_auth import ApiAuthorizer
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = ["TokenAuth"]


class TokenAuth(httpx.Auth):
    """Adds the manager's token to ``httpx.AsyncClient`` requests; retries a 401 once.

    Use ``httpx.AsyncClient(auth=manager.httpx_auth())``. It behaves like the aiohttp
    middleware: each request to a Commerce Layer host (see ``TokenDestinations``) gets
    ``Authorization: Bearer <token>``; on every 401 it invalidates exactly the token it
    sent and sends the request once more with a fresh token; a second 401 is returned as
    is. A request that already has an ``Authorization`` header and a request to another
    host are left alone. A 401 to a request whose streamed body cannot be sent again is
    returned without a retry, but its token is still invalidated, so the caller's own
    retry gets a fresh one.

    Only ``httpx.AsyncClient`` is supported: the manager is asynchronous. When no token
    can be had, the manager's ``TokenError`` comes out of ``client.get(...)`` and the
    request is not sent.

    Args:
        manager: the ``TokenManager`` that provides the tokens.
        scope: the scope of the tokens; None for the manager's default.
        hosts: extra host names that may receive the token (``*.example.com`` for a
            domain's subdomains), e.g. a proxy in front of the API.
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
        return f"TokenAuth(manager={self._auth.manager!r}, scope={self._auth.scope!r})"

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Refuse: the token manager is async-only."""
        raise ConfigurationError(
            "cl_tokens TokenAuth works with httpx.AsyncClient only (the token manager is "
            "asynchronous); use httpx.AsyncClient(auth=manager.httpx_auth())"
        )

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send ``request`` with the token; on a 401, once more with a fresh one.

        Args:
            request: the request httpx is about to send.
        """
        has_authorization = "Authorization" in request.headers
        if not self._auth.should_authorize(str(request.url), has_authorization=has_authorization):
            yield request
            return
        sent = await self._auth.token()
        request.headers["Authorization"] = sent.authorization
        response = yield request
        if response.status_code != 401:
            return
        if response.request.headers.get("Authorization") != sent.authorization:
            return  # a redirect took it elsewhere (httpx strips the token across origins)
        fresh = await self._auth.after_401(sent, replayable=_replayable(request))
        if fresh is None:
            return
        request.headers["Authorization"] = fresh.authorization
        yield request  # the flow ends after this one: no second retry


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again (httpx keeps bytes, not streamed iterators)."""
    try:
        request.content  # noqa: B018 - raises for a streamed body
    except httpx.RequestNotRead:
        return False
    return True
