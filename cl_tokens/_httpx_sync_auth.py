"""An ``httpx.Auth`` for ``httpx.Client`` that authorizes Commerce Layer API requests.

httpx is an optional extra: this module is imported only by
``SyncTokenManager.httpx_auth()``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("httpx_auth() needs httpx: pip install 'cl-tokens[httpx]'") from exc

from ._errors import ConfigurationError
from ._sync_auth import SyncAuthorizer

if TYPE_CHECKING:
    from ._sync import SyncTokenManager

__all__ = ["SyncTokenAuth"]


class SyncTokenAuth(httpx.Auth):
    """Adds the manager's token to ``httpx.Client`` requests; retries a 401 once.

    Use ``httpx.Client(auth=manager.httpx_auth())``. It behaves like
    ``requests_auth()`` and the aiohttp middleware: each request to a Commerce Layer host
    (see ``TokenDestinations``) gets ``Authorization: Bearer <token>``; on every 401 it
    invalidates exactly the token it sent and sends the request once more with a fresh
    token; a second 401 is returned as is. A request that already has an
    ``Authorization`` header and a request to another host are left alone. A 401 to a
    request whose streamed body cannot be sent again is returned without a retry, but
    its token is still invalidated.

    Only ``httpx.Client`` is supported; for ``httpx.AsyncClient`` use the async
    ``TokenManager.httpx_auth()``.

    Args:
        manager: the ``SyncTokenManager`` that provides the tokens.
        scope: the scope of the tokens; None for the manager's default.
        hosts: extra host names that may receive the token (``*.example.com`` for a
            domain's subdomains), e.g. a proxy in front of the API.
        customer: a customer's ``owner_id``: send their token (see ``login``), not
            the app's; a 401 renews it with the refresh token.
    """

    def __init__(
        self,
        manager: SyncTokenManager,
        *,
        scope: str | None = None,
        hosts: Iterable[str] = (),
        customer: str | None = None,
    ) -> None:
        self._auth = SyncAuthorizer(manager, scope=scope, hosts=hosts, customer=customer)

    def __repr__(self) -> str:
        return f"SyncTokenAuth(manager={self._auth.manager!r}, scope={self._auth.scope!r})"

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Send ``request`` with the token; on a 401, once more with a fresh one.

        Args:
            request: the request httpx is about to send.
        """
        has_authorization = "Authorization" in request.headers
        if not self._auth.should_authorize(str(request.url), has_authorization=has_authorization):
            yield request
            return
        sent = self._auth.token()
        request.headers["Authorization"] = sent.authorization
        response = yield request
        if response.status_code != 401:
            return
        if response.request.headers.get("Authorization") != sent.authorization:
            return  # a redirect took it elsewhere (httpx strips the token across origins)
        fresh = self._auth.after_401(sent, replayable=_replayable(request))
        if fresh is None:
            return
        request.headers["Authorization"] = fresh.authorization
        yield request  # the flow ends after this one: no second retry

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Refuse: a blocking manager must not be waited on inside an event loop."""
        raise ConfigurationError(
            "the SyncTokenManager's httpx_auth() works with httpx.Client only; for "
            "httpx.AsyncClient use the async TokenManager's httpx_auth()"
        )
        yield request  # pragma: no cover - makes this an async generator


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again (httpx keeps bytes, not streamed iterators)."""
    try:
        request.content  # noqa: B018 - raises for a streamed body
    except httpx.RequestNotRead:
        return False
    return True
