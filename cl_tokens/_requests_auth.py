"""A ``requests.auth.AuthBase`` that authorizes Commerce Layer API requests.

requests is an optional extra: this module is imported only by
``SyncTokenManager.requests_auth()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

try:
    import requests
    from requests.cookies import extract_cookies_to_jar
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("requests_auth() needs requests: pip install 'cl-tokens[requests]'") from exc

from ._sync_auth import SyncAuthorizer
from ._token import Token

if TYPE_CHECKING:
    from ._sync import SyncTokenManager

__all__ = ["RequestsTokenAuth"]


class RequestsTokenAuth(requests.auth.AuthBase):
    """Adds the manager's token to ``requests`` requests; retries a 401 once.

    Use ``session.auth = manager.requests_auth()`` (or ``auth=`` on one call). It
    behaves like the aiohttp middleware: each request to a Commerce Layer host (see
    ``TokenDestinations``) gets ``Authorization: Bearer <token>``; on every 401 it
    invalidates exactly the token it sent (many threads that saw the same stale token
    cause one new token request, and a token someone already replaced is left alone) and
    sends the request once more with a fresh token, returning the second answer with the
    first in ``response.history``. A second 401 is returned as is. A request that
    already has an ``Authorization`` header and a request to another host are left
    alone. A 401 to a request whose body is a stream or a file (which cannot be sent
    again) is returned without a retry, but its token is still invalidated, so the
    caller's own retry gets a fresh one.

    When no token can be had, the manager's ``TokenError`` comes out of
    ``session.get(...)`` and the request is not sent.

    Args:
        manager: the ``SyncTokenManager`` that provides the tokens.
        scope: the scope of the tokens; None for the manager's default.
        hosts: extra host names that may receive the token (``*.example.com`` for a
            domain's subdomains), e.g. a proxy in front of the API.
        customer: a customer's ``owner_id``: send their token (see ``login``), not
            the app's; a 401 renews it with the refresh token.

    Raises:
        ConfigurationError: a host is not a plain host name.
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
        return f"RequestsTokenAuth(manager={self._auth.manager!r}, scope={self._auth.scope!r})"

    def __eq__(self, other: object) -> bool:
        # requests compares auth objects when merging session and request settings.
        return self is other

    __hash__ = object.__hash__

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Add the token to ``request`` and arrange the retry of a 401.

        Args:
            request: the request requests is about to send.
        """
        has_authorization = "Authorization" in request.headers
        url = request.url or ""
        if not self._auth.should_authorize(url, has_authorization=has_authorization):
            return request
        sent = self._auth.token()
        request.headers["Authorization"] = sent.authorization
        request.register_hook(  # type: ignore[no-untyped-call]
            "response", partial(self._after_response, sent)
        )
        return request

    def _after_response(
        self, sent: Token, response: requests.Response, **kwargs: Any
    ) -> requests.Response:
        """The response hook: on a 401 to the token we sent, send once more."""
        if response.status_code != 401:
            return response
        refused = response.request
        if refused.headers.get("Authorization") != sent.authorization:
            return response  # a redirect took it elsewhere (requests strips the token)
        fresh = self._auth.after_401(sent, replayable=_replayable(refused))
        if fresh is None:
            return response
        # Read the small error body and give the connection back for the retry.
        response.content  # noqa: B018
        response.close()
        retry = refused.copy()
        jar = retry._cookies  # type: ignore[attr-defined]
        extract_cookies_to_jar(jar, refused, response.raw)  # type: ignore[no-untyped-call]
        retry.prepare_cookies(jar)
        retry.headers["Authorization"] = fresh.authorization
        # Sent by the adapter, not the session: response hooks do not run again, so
        # the retry cannot retry.
        second: requests.Response = response.connection.send(retry, **kwargs)
        second.history.append(response)
        second.request = retry
        return second


def _replayable(request: requests.PreparedRequest) -> bool:
    """Whether the body can be sent again: none, or bytes/str (not a stream or file)."""
    return request.body is None or isinstance(request.body, (bytes, str))
