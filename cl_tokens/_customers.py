"""Customer tokens: logins, and renewals with single-use refresh tokens in a fleet.

A customer's token takes the app token's path (hot tier, single flight, shared backend,
lock); only its key (which adds the owner) and its grant differ. The renewal is the
hard part: Commerce Layer rotates refresh tokens, so a refresh token sent twice (two
processes renewing at once) can log the customer out. A refresh token is sent only by
the holder of the backend's lock, which re-reads the stored pair, uses it if another
process renewed meanwhile, else writes an in-flight mark into it (``refresh_sent``)
*before* sending it, and writes the new pair before releasing the lock.

A marked refresh token is never sent again, by any process: it may be spent. A holder
that finds a marked pair (the lock of the one that sent it was lost, or that process
died) waits for its answer to be written, until ``attempt_timeout + 2 *
backend_timeout`` after the mark; if none comes, the customer must log in again. The
mark is cleared only when the server answered without taking the token (5xx, 429).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ._errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    LoginRequiredError,
    TokenEndpointError,
)
from ._grants import Grant, authorization_code, create_assertion, jwt_bearer, password
from ._grants import refresh_token as refresh_grant
from ._retry import with_retries
from ._token import Token, fingerprint
from .backends import MemoryBackend

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

    import aiohttp

    from ._clock import Clock
    from ._endpoint import TokenEndpoint
    from ._memory_tier import MemoryTier, ScopeArg
    from ._shared import SharedTier
    from ._singleflight import SingleFlight
    from ._tuning import Tuning

__all__ = ["CustomerTokens", "Owner"]

logger = logging.getLogger("cl_tokens")


@dataclass(frozen=True, slots=True)  # one per customer held
class Owner:
    """Who a customer key acts for, and how a renewal without refresh token goes."""

    owner_id: str
    owner_type: str = "Customer"
    # login_as(): renew with a new assertion when the server gave no refresh token.
    assertion_claims: Mapping[str, Any] | None = None
    by_assertion: bool = False


class CustomerTokens:
    """The customer half of ``TokenManager`` (a mixin: it shares the manager's state)."""

    if TYPE_CHECKING:  # what it uses of the manager
        _auth_url: str
        _client_id: str
        _client_secret: str | None
        _body_encoding: str
        _clock: Clock
        _endpoint: TokenEndpoint
        _flights: SingleFlight[str, Token]
        _keys: dict[ScopeArg, tuple[str, str | None]]
        _rejected: dict[str, tuple[str, float]]
        _rng: random.Random
        _shared: SharedTier
        _tier: MemoryTier
        _tuning: Tuning
        _check_open: Callable[[], None]
        _bind_loop: Callable[[], None]
        _resolve: Callable[[object], tuple[str, str | None]]

        async def _get_session(self) -> aiohttp.ClientSession: ...

    def _init_customers(self) -> None:
        # The login_as() owners (they renew by assertion), by customer key. Other
        # customers need nothing here: their token holds their owner id, and a flight
        # carries the owner id of the customer it renews.
        self._owners: dict[str, Owner] = {}
        # The latest pair known per customer key, least recently renewed first (a plain
        # dict keeps insertion order at a third of an OrderedDict's cost per entry).
        self._pairs: dict[str, Token] = {}

    # -- logins ----------------------------------------------------------------------

    async def login(self, username: str, password_: str, *, scope: str | None = None) -> Token:
        """Log a customer in (password grant); their token is cached per owner.

        Returns the ``Token``, with ``owner_id``, ``owner_type`` and a ``refresh_token``
        (never shown). Afterwards ``header(customer=token.owner_id)`` serves it and
        renews it with the refresh token ahead of expiry, once for the whole fleet.

        Raises:
            AuthenticationError: wrong username or password (the server's 401).
            ConfigurationError: the backend would store refresh tokens in clear.
        """
        return await self._log_in(password(username, password_), scope, None)

    async def login_as(
        self,
        owner_id: str,
        *,
        owner_type: str = "Customer",
        claims: Mapping[str, Any] | None = None,
        scope: str | None = None,
    ) -> Token:
        """Act for a customer authenticated elsewhere (JWT bearer grant, ``create_assertion``).

        Renewals use the refresh token when the server gave one, else a new assertion.
        """
        assertion = create_assertion(owner_id=owner_id, owner_type=owner_type, claims=claims)
        owner = Owner(owner_id, owner_type, dict(claims) if claims else None, by_assertion=True)
        return await self._log_in(jwt_bearer(assertion), scope, owner)

    async def exchange_code(
        self, code: str, redirect_uri: str, *, scope: str | None = None
    ) -> Token:
        """Exchange an authorization code (webapps); the token is cached per owner."""
        return await self._log_in(authorization_code(code, redirect_uri), scope, None)

    async def logout(self, customer: str, *, scope: str | None = None) -> bool:
        """Revoke a customer's refresh and access tokens and drop them from every tier.

        Returns False when nothing was cached for them. Afterwards
        ``header(customer=...)`` raises ``LoginRequiredError``.
        """
        from ._revoke import revoke_token

        self._check_open()
        self._bind_loop()
        key, _ = self._resolve((scope, customer))
        pair = await self._shared.read(key) or self._pairs.get(key)
        entry = self._tier.get(key)
        known = [t for t in (pair, entry.token if entry else None) if t is not None]
        self._forget_customer(key)
        await self._shared.delete(key)
        if not known:
            return False
        session = await self._get_session()
        revoke = partial(
            revoke_token,
            session,
            auth_url=self._auth_url,
            client_id=self._client_id,
            client_secret=self._client_secret,
            timeout=self._tuning.attempt_timeout,
            form=self._body_encoding == "form",
        )
        refresh = next((t.refresh_token for t in known if t.refresh_token), None)
        if refresh is not None:
            await revoke(known[0], value=refresh)
        for access in {t.access_token: t for t in known}.values():
            await revoke(access)
        logger.info("customer logged out; tokens %s revoked", fingerprint(known[0].access_token))
        return True

    async def _log_in(self, grant: Grant, scope_arg: str | None, owner: Owner | None) -> Token:
        self._check_open()
        self._bind_loop()
        self._check_refresh_storage()
        _, scope = self._resolve(scope_arg)
        tuning = self._tuning
        token = await with_retries(
            partial(self._endpoint.request, scope, grant=grant),
            attempts=tuning.attempts,
            attempt_timeout=tuning.attempt_timeout,
            deadline=tuning.fetch_deadline,
            base=tuning.backoff_base,
            cap=tuning.backoff_cap,
            clock=self._clock,
            rng=self._rng,
        )
        owner_id = token.owner_id or (owner.owner_id if owner else None)
        if owner_id is None:
            raise TokenEndpointError(
                f"token endpoint sent a malformed response to a {grant.label} login: "
                "owner_id is missing",
                status=200,
            )
        owner = owner or Owner(owner_id, token.owner_type or "Customer")
        if token.owner_id is None:
            token = replace(token, owner_id=owner_id, owner_type=owner.owner_type)
        arg = (scope_arg, owner_id)
        key, _ = self._resolve(arg)
        if owner.by_assertion:
            self._owners[key] = owner
        else:
            self._owners.pop(key, None)
        self._rejected.pop(key, None)
        await self._shared.write(key, token)
        self._install(key, token)
        entry = self._tier.get(key)
        if entry is not None:
            self._tier.promote(arg, entry)
        logger.info(
            "customer logged in (%s); token %s", grant.label, fingerprint(token.access_token)
        )
        return token

    # -- renewal -----------------------------------------------------------------------

    async def _renew(self, key: str, scope: str | None, owner_id: str) -> Token:
        """A customer's new token, under the backend's lock (see the module docstring)."""
        owner = self._owners.get(key)
        stored = await self._shared.read(key)
        # The store is the fleet's truth: a pair in memory may hold a refresh token that
        # another process has already spent. Only without a stored pair (a private
        # memory:// store, or one that lost it) is the in-process pair used.
        if stored is None and not self._shared.available:
            raise self._unrenewed("the shared backend could not be read")
        pair = stored if stored is not None else self._pairs.get(key)
        if pair is not None and pair.refresh_token is not None:
            if pair.refresh_sent is None:
                return await self._send_refresh(key, scope, pair, owner_id)
            answer = await self._await_answer(key, pair)
            if answer is not None:
                if answer.refresh_token == pair.refresh_token:
                    # Unmarked: the server answered without taking it (5xx, 429).
                    return await self._send_refresh(key, scope, answer, owner_id)
                if answer.refresh_token is not None:
                    return answer
        if owner is not None and owner.by_assertion:
            assertion = create_assertion(
                owner_id=owner.owner_id,
                owner_type=owner.owner_type,
                claims=owner.assertion_claims,
            )
            token = await self._endpoint.request(
                scope, self._tuning.attempt_timeout, jwt_bearer(assertion)
            )
            return self._owned(token, owner_id, owner.owner_type)
        if pair is not None and pair.refresh_sent is not None:
            raise LoginRequiredError(
                "the customer's refresh token was sent by a process whose answer never "
                "came (it died, or its request timed out); it may be spent, and a refresh "
                "token is never sent twice: log in again",
                owner_id=owner_id,
                status=401,
            )
        raise LoginRequiredError(
            "no token or refresh token is cached for this customer: log in again",
            owner_id=owner_id,
            status=401,
        )

    async def _await_answer(self, key: str, marked: Token) -> Token | None:
        """The pair that replaced ``marked`` (in flight elsewhere), or None if none came
        by the time its sender must have written its answer."""
        tuning = self._tuning
        assert marked.refresh_sent is not None  # noqa: S101 - checked by the caller
        until = marked.refresh_sent + tuning.attempt_timeout + 2 * tuning.backend_timeout
        while True:
            again = await self._shared.read(key)
            if again is not None and (
                again.refresh_token != marked.refresh_token or again.refresh_sent is None
            ):
                return again
            if self._clock.time() >= until:
                return None
            await asyncio.sleep(max(tuning.lock_poll_interval, 0.05))

    async def _send_refresh(self, key: str, scope: str | None, pair: Token, owner_id: str) -> Token:
        spent = pair.refresh_token
        assert spent is not None  # noqa: S101 - checked by the caller (for mypy)
        unmarked = replace(pair, refresh_sent=None, seal=None)
        marked = replace(unmarked, refresh_sent=self._clock.time())
        # Only the lock's holder sends, and only once the fleet can see the mark: from
        # then on, whatever happens to this process, no process sends this token again.
        if not self._shared.holds(key):
            raise self._unrenewed("its lock could not be had")
        if not await self._shared.write(key, marked, retry=False):
            # A write that timed out may still land: take the mark back (nothing was
            # sent), or the fleet would wait for an answer that never comes.
            await self._store_pair(key, unmarked)
            raise self._unrenewed("the in-flight mark could not be stored")
        self._pairs[key] = marked
        try:
            token = await self._endpoint.request(
                scope, self._tuning.attempt_timeout, refresh_grant(spent)
            )
        except AuthenticationError as error:
            again = await self._shared.read(key)
            if again is not None and again.refresh_token not in (None, spent):
                return again  # another process rotated it meanwhile (a lost lock)
            # Refused (spent, revoked, expired): nobody need wait for an answer to it.
            dropped = replace(unmarked, refresh_token=None, refresh_expires_at=None)
            await self._store_pair(key, dropped)
            self._pairs[key] = dropped
            raise LoginRequiredError(
                f"the customer's refresh token was refused ({error}): log in again",
                owner_id=owner_id,
                status=error.status,
                code=error.code,
                title=error.title,
                detail=error.detail,
            ) from None
        except TokenEndpointError as error:
            if error.status is not None:
                # The server answered (5xx, 429): it did not take the refresh token.
                await self._store_pair(key, unmarked)
                self._pairs[key] = unmarked
            raise
        token = self._owned(token, owner_id, pair.owner_type)
        # Stored at once, whatever the caller makes of it (an answer so late that its
        # access token is already inside its margin is refused by the manager): its
        # refresh token is now the customer's only valid one.
        await self._store_pair(key, token)
        self._pairs[key] = token
        logger.info("customer token renewed: %s", fingerprint(token.access_token))
        return token

    async def _store_pair(self, key: str, token: Token) -> bool:
        """Write a pair over its mark, trying again while this process holds the lock:
        until it lands, the fleet sees only the mark, and must take the customer for
        logged out once the mark is old. (Never in the background: see
        ``SharedTier.write``.)"""
        delay = 0.05
        while not await self._shared.write(key, token, retry=False):
            if not self._shared.holds(key):
                logger.warning(
                    "a customer's token %s could not be stored over its in-flight mark; "
                    "other processes will take the customer for logged out",
                    fingerprint(token.access_token),
                )
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)
        return True

    @staticmethod
    def _unrenewed(why: str) -> BackendError:
        return BackendError(
            f"a customer's refresh token is sent only under the shared backend's lock, "
            f"once its in-flight mark is stored; {why}: not renewed (the current token is "
            "served while it lasts)"
        )

    @staticmethod
    def _owned(token: Token, owner_id: str, owner_type: str | None) -> Token:
        if token.owner_id is not None:
            return token
        return replace(token, owner_id=owner_id, owner_type=owner_type or "Customer")

    # -- the in-process pairs ----------------------------------------------------------

    def _install(self, key: str, token: Token) -> Token:
        installed = self._tier.install(key, token)
        # A login can install a token while a miss-flight for the same key still runs
        # (one that will fail: it found nothing to renew): callers from now on read it.
        self._flights.unalias(key)
        if token.owner_id is not None:  # a customer's (an app token has no owner)
            self._pairs.pop(key, None)  # to the end: the most recently renewed
            self._pairs[key] = token
            while len(self._pairs) > self._tuning.max_customers:
                oldest = next(iter(self._pairs))
                self._forget_customer(oldest)
        return installed

    def _forget_customer(self, key: str) -> None:
        self._pairs.pop(key, None)
        self._owners.pop(key, None)
        self._tier.drop(key)
        for arg in [a for a, (k, _) in self._keys.items() if k == key]:
            del self._keys[arg]

    def _forget_spent_pairs(self, now: float) -> None:
        for key in [k for k, t in self._pairs.items() if t.keep_until <= now]:
            self._forget_customer(key)

    def _check_refresh_storage(self) -> None:
        """Refuse to put refresh tokens (credentials) in a shared store in clear."""
        backend = self._shared.backend
        if isinstance(backend, MemoryBackend) or self._tuning.allow_plaintext_refresh_tokens:
            return
        codec = getattr(backend, "_codec", None)
        if getattr(backend, "encrypted", None) or getattr(codec, "encrypted", False):
            return
        raise ConfigurationError(
            f"{type(backend).__name__} would store customers' refresh tokens (credentials) "
            "in clear: set an encryption key (CL_TOKEN_ENCRYPTION_KEY, or encryption_key=), "
            "or allow_plaintext_refresh_tokens=True if the store is private"
        )
