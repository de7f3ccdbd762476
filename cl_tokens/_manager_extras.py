"""What the manager offers around ``header()``: construction from settings, revocation,
and the HTTP client integrations (a mixin of ``TokenManager``, like ``CustomerTokens``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

    import aiohttp

    from ._aiohttp_middleware import TokenMiddleware
    from ._httpx_auth import TokenAuth
    from ._memory_tier import MemoryTier
    from ._settings import Settings
    from ._shared import SharedTier
    from ._tuning import Tuning

__all__ = ["ManagerExtras"]

_M = TypeVar("_M", bound="ManagerExtras")

logger = logging.getLogger("cl_tokens")


class ManagerExtras:
    """Settings, ``revoke`` and integrations of ``TokenManager``."""

    if TYPE_CHECKING:  # what it uses of the manager
        _auth_url: str
        _client_id: str
        _client_secret: str | None
        _body_encoding: str
        _shared: SharedTier
        _tier: MemoryTier
        _tuning: Tuning
        _check_open: Callable[[], None]
        _bind_loop: Callable[[], None]
        _resolve: Callable[[object], tuple[str, str | None]]

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        async def _get_session(self) -> aiohttp.ClientSession: ...
        async def invalidate(
            self, access_token: str, scope: str | None = None, *, customer: str | None = None
        ) -> bool: ...

    @classmethod
    def from_settings(
        cls: type[_M], settings: Settings | Mapping[str, Any], **overrides: Any
    ) -> _M:
        """A manager from a ``Settings`` or a settings mapping (``Settings.from_mapping``).

        ``overrides`` (e.g. ``session=``, ``clock=``) win over the settings.
        """
        from ._settings import Settings

        if not isinstance(settings, Settings):
            settings = Settings.from_mapping(settings)
        return cls(**{**settings.manager_kwargs(), **overrides})

    @classmethod
    def from_env(
        cls: type[_M],
        environ: Mapping[str, str] | None = None,
        prefix: str = "CL_",
        **overrides: Any,
    ) -> _M:
        """A manager configured from environment variables (``CL_CLIENT_ID``, ...)."""
        from ._settings import Settings

        return cls.from_settings(Settings.from_env(environ, prefix=prefix), **overrides)

    async def revoke(self, scope: str | None = None) -> bool:
        """Revoke the cached token for ``scope`` at ``{iss}/oauth/revoke`` and drop it.

        The revocation URL comes from the token's ``iss`` claim, else the auth_url's
        origin. Returns False when no token was cached (nothing to revoke).

        Raises:
            AuthenticationError: the endpoint rejected the credentials.
            TokenEndpointError: the endpoint failed or could not be reached.
        """
        from ._revoke import revoke_token

        self._check_open()
        self._bind_loop()
        key, _ = self._resolve(scope)
        entry = self._tier.get(key)
        token = entry.token if entry is not None else await self._shared.read(key)
        if token is None:
            return False
        await revoke_token(
            await self._get_session(),
            token,
            auth_url=self._auth_url,
            client_id=self._client_id,
            client_secret=self._client_secret,
            timeout=self._tuning.attempt_timeout,
            form=self._body_encoding == "form",
        )
        await self.invalidate(token.access_token, scope)
        return True

    def aiohttp_middleware(
        self, *, scope: str | None = None, hosts: Iterable[str] = (), customer: str | None = None
    ) -> TokenMiddleware:
        """An aiohttp (>= 3.12) client middleware: ``ClientSession(middlewares=[...])``.

        It adds the Authorization header and, on a 401 from the API, invalidates exactly
        the token it sent and retries the request once with a fresh one.

        Args:
            scope: the scope of the tokens it sends (the manager's default when None).
            hosts: extra hosts that may receive the token (``api.example.com`` or
                ``*.example.com``), beyond https ``*.commercelayer.io`` and the
                auth_url's origin.
            customer: a customer's ``owner_id``: send their token (see ``login``).
        """
        from ._aiohttp_middleware import TokenMiddleware

        return TokenMiddleware(self, scope=scope, hosts=hosts, customer=customer)  # type: ignore[arg-type]

    def httpx_auth(
        self, *, scope: str | None = None, hosts: Iterable[str] = (), customer: str | None = None
    ) -> TokenAuth:
        """An ``httpx.Auth`` for ``httpx.AsyncClient`` with the middleware's behaviour.

        Needs the ``httpx`` extra: ``pip install 'cl-tokens[httpx]'``. Arguments as for
        ``aiohttp_middleware``.
        """
        from ._httpx_auth import TokenAuth

        return TokenAuth(self, scope=scope, hosts=hosts, customer=customer)  # type: ignore[arg-type]
