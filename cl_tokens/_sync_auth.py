"""What ``requests_auth()`` and the sync ``httpx_auth()`` share: the synchronous
counterpart of ``_api_auth.ApiAuthorizer``, with the same rules for which requests may
carry the token (``TokenDestinations``) and what a 401 from the API means."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._api_auth import TokenDestinations
from ._token import Token

if TYPE_CHECKING:
    from ._sync import SyncTokenManager

__all__ = ["SyncAuthorizer"]


class SyncAuthorizer:
    """The token side of an API request sent by a synchronous client.

    Args:
        manager: the ``SyncTokenManager`` that provides the tokens.
        scope: the scope of the tokens; None for the manager's default.
        hosts: extra host names that may receive the token (see ``TokenDestinations``).
        customer: a customer's ``owner_id``: send their token, not the app's.

    Raises:
        ConfigurationError: a host is not a plain host name.
    """

    def __init__(
        self,
        manager: SyncTokenManager,
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

        Not: a request to the manager's own token or revocation endpoint, a request
        whose caller set its own ``Authorization``, a request to a host that may not
        receive the token. (The manager's own token requests go out through aiohttp on
        its private loop, never through this client.)
        """
        return not (
            has_authorization
            or self._destinations.is_token_endpoint(url)
            or not self._destinations.allows(url)
        )

    def token(self) -> Token:
        return self.manager.token(self.scope, customer=self.customer)

    def after_401(self, sent: Token, *, replayable: bool) -> Token | None:
        """The token to send the refused request again with, or None for no retry.

        Every 401 drops the token it refused, retried or not; no retry for a body that
        cannot be sent again, nor when the same token would only be refused again.
        """
        self.manager.invalidate(sent.access_token, self.scope, customer=self.customer)
        if not replayable:
            return None
        fresh = self.token()
        return None if fresh.access_token == sent.access_token else fresh
