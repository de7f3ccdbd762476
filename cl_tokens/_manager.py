"""The token manager: read the tiers, share one flight per key, fetch, write.

Reading order for a key: the hot tier (a dict lookup, no clock read, no lock, no I/O),
then the in-process memory tier (checked against the wall clock), then the shared
backend, then — under the backend's lock, so one process fetches for all — the token
endpoint. A hot entry is retired by a loop timer when its token enters the refresh
window, and by a periodic wall-clock check that catches what timers miss (clock jumps,
a suspended process, an injected clock).
"""

from __future__ import annotations

import asyncio
import logging
import random
import warnings
import weakref
from collections.abc import Mapping
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

from ._clock import Clock, SystemClock
from ._cooldown import Cooldowns
from ._customers import CustomerTokens
from ._endpoint import BodyEncoding, TokenEndpoint
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    TokenEndpointError,
    TokenError,
)
from ._keys import credential_keys
from ._lifecycle import (
    LIVE,
    argument_problems,
    backend_problems,
    bind_loop,
    forget_idle,
    reset_after_fork,
    time_left,
    warn_unclosed,
)
from ._lock_wait import LockWaiting
from ._manager_extras import ManagerExtras
from ._memory_tier import Entry, MemoryTier, ScopeArg
from ._metrics import metrics
from ._retry import with_retries
from ._shared import SharedTier
from ._singleflight import SingleFlight
from ._throttle import Throttle, throttles
from ._token import Token, fingerprint
from ._tuning import Tuning, safety_margin
from ._version import package_version
from .backends import MemoryBackend, TokenBackend, backend_from_url

if TYPE_CHECKING:
    from .backends._codec import EncryptionKey

__all__ = ["DEFAULT_AUTH_URL", "TokenManager"]

logger = logging.getLogger("cl_tokens")

DEFAULT_AUTH_URL = "https://auth.commercelayer.io/oauth/token"


class TokenManager(CustomerTokens, ManagerExtras, LockWaiting):
    """Gets, caches and shares OAuth2 client_credentials tokens.

    ``await manager.header()`` costs about a dict lookup while a token is cached; on a
    miss, exactly one request goes to the token endpoint however many coroutines (single
    flight) and processes (the shared backend's lock) ask at once.

    Args:
        client_id: the API credentials' client id.
        client_secret: the client secret (None for sales-channel credentials).
        scope: the default scope, e.g. ``market:code:europe``; None for no scope.
        auth_url: the token endpoint; https, or http to a loopback host for tests.
        backend: where tokens are shared: None (a private in-memory store), a URL
            (``memory://``, ``file:///var/cache/cl-tokens``, ``redis://host:6379/0``)
            or a ``TokenBackend`` instance (not closed by the manager).
        backend_options: keyword options for the backend built from a URL.
        encryption_key: Fernet key(s) for the values a ``file://`` or ``redis://``
            backend built from a URL stores (``pip install 'cl-tokens[encryption]'``);
            the same as ``backend_options={"encryption_key": ...}``.
        session: an ``aiohttp.ClientSession`` to use (not closed by the manager);
            otherwise the manager creates one when first needed.
        body_encoding: ``"json"`` (what Commerce Layer documents) or ``"form"``
            (``application/x-www-form-urlencoded``, what RFC 6749 servers expect).
        clock: wall and monotonic time; inject one to test expiry without sleeping.

    Every option of ``cl_tokens.Tuning`` (safety_margin, refresh_window, attempts,
    fetch_deadline, throttle_cap, lock_lease, strict, max_customers, ...) is a keyword
    argument too, with the defaults documented there.

    Raises:
        ConfigurationError: listing every invalid argument.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str | None = None,
        *,
        scope: str | None = None,
        auth_url: str = DEFAULT_AUTH_URL,
        backend: TokenBackend | str | None = None,
        backend_options: Mapping[str, Any] | None = None,
        encryption_key: EncryptionKey | None = None,
        session: aiohttp.ClientSession | None = None,
        body_encoding: BodyEncoding = "json",
        clock: Clock | None = None,
        safety_margin: float = Tuning.safety_margin,
        refresh_window: float = Tuning.refresh_window,
        refresh_jitter: float = Tuning.refresh_jitter,
        min_refresh_gap: float = Tuning.min_refresh_gap,
        attempts: int = Tuning.attempts,
        backoff_base: float = Tuning.backoff_base,
        backoff_cap: float = Tuning.backoff_cap,
        throttle_cap: float = Tuning.throttle_cap,
        fetch_deadline: float = Tuning.fetch_deadline,
        attempt_timeout: float = Tuning.attempt_timeout,
        auth_failure_cooldown: float = Tuning.auth_failure_cooldown,
        lock_lease: float = Tuning.lock_lease,
        lock_wait: float | None = Tuning.lock_wait,
        lock_poll_interval: float = Tuning.lock_poll_interval,
        backend_timeout: float = Tuning.backend_timeout,
        backend_retry_interval: float = Tuning.backend_retry_interval,
        clock_check_interval: float = Tuning.clock_check_interval,
        hot_tier: bool = Tuning.hot_tier,
        strict: bool = Tuning.strict,
        max_customers: int = Tuning.max_customers,
        allow_plaintext_refresh_tokens: bool = Tuning.allow_plaintext_refresh_tokens,
    ) -> None:
        problems = argument_problems(client_id, client_secret, scope, auth_url, body_encoding)
        options = backend_problems(problems, backend, backend_options, encryption_key, session)
        try:
            self._tuning = Tuning(
                safety_margin=safety_margin,
                refresh_window=refresh_window,
                refresh_jitter=refresh_jitter,
                min_refresh_gap=min_refresh_gap,
                attempts=attempts,
                backoff_base=backoff_base,
                backoff_cap=backoff_cap,
                throttle_cap=throttle_cap,
                fetch_deadline=fetch_deadline,
                attempt_timeout=attempt_timeout,
                auth_failure_cooldown=auth_failure_cooldown,
                lock_lease=lock_lease,
                lock_wait=lock_wait,
                lock_poll_interval=lock_poll_interval,
                backend_timeout=backend_timeout,
                backend_retry_interval=backend_retry_interval,
                clock_check_interval=clock_check_interval,
                hot_tier=hot_tier,
                strict=strict,
                max_customers=max_customers,
                allow_plaintext_refresh_tokens=allow_plaintext_refresh_tokens,
            )
        except ConfigurationError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigurationError("invalid TokenManager arguments: " + "; ".join(problems))

        self._clock: Clock = clock or SystemClock()
        self._client_id = client_id
        self._scope = scope
        self._auth_url = auth_url
        self._client_secret = client_secret
        self._body_encoding = body_encoding
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._endpoint = TokenEndpoint(
            auth_url=auth_url,
            client_id=client_id,
            client_secret=client_secret,
            body_encoding=body_encoding,
            clock=self._clock,
            session=self._get_session,
            user_agent=f"cl-tokens/{package_version()}",
        )
        self._owns_backend = not isinstance(backend, TokenBackend)
        # scrypt of the secret, once per credential per process: keys and MACs come
        # from it, so neither a key nor a stored value reveals or accepts a wrong secret.
        self._credential = credential_keys(auth_url, client_id, client_secret)
        built = self._build_backend(backend, options)
        self._shared = SharedTier(
            built,
            clock=self._clock,
            strict=self._tuning.strict,
            timeout=self._tuning.backend_timeout,
            retry_interval=self._tuning.backend_retry_interval,
            keys=self._credential,
            backoff_cap=self._tuning.throttle_cap,
            sealed=not (self._owns_backend and isinstance(built, MemoryBackend)),
        )
        self._rng = random.Random()  # noqa: S311 - jitter of timings, not a secret
        self._tier = MemoryTier(self._tuning, self._clock, self._rng)
        # The hot tier's dicts, bound here: a warm call is one of these lookups and a new
        # dict. Entries are retired by the tier, never checked, on the hot path.
        self._hot_headers = self._tier.headers
        self._hot_tokens = self._tier.tokens
        self._hot_customers = self._tier.customer_headers
        self._keys: dict[ScopeArg, tuple[str, str | None]] = {}
        self._flights: SingleFlight[str, Token] = SingleFlight(
            cancelled=lambda: TokenError("the TokenManager was closed while this call waited")
        )
        # Concurrent invalidate() calls for the same token share one backend delete.
        self._deletes: SingleFlight[tuple[str, str], bool] = SingleFlight()
        self._cooldowns = Cooldowns(self._tuning, self._clock)
        # Access tokens dropped by invalidate() or found stale, with their expiry: a read
        # of the shared backend must not bring them back while they may still be there.
        self._rejected: dict[str, tuple[str, float]] = {}
        self._throttle = Throttle(self._tuning, self._clock, self._shared)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self._init_customers()
        LIVE.add(self)
        self._gauge = partial(time_left, weakref.ref(self))
        metrics.watch(self._gauge)

    def _build_backend(
        self, backend: TokenBackend | str | None, options: dict[str, Any]
    ) -> TokenBackend:
        if isinstance(backend, TokenBackend):
            return backend
        if backend is None or backend.strip().lower() == "memory://":
            if options:
                raise ConfigurationError("the memory backend takes no backend_options")
            return MemoryBackend(clock=self._clock)
        return backend_from_url(backend, **options)

    # -- public API ----------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def scope(self) -> str | None:
        """The default scope of calls that pass none."""
        return self._scope

    @property
    def auth_url(self) -> str:
        return self._auth_url

    @property
    def backend(self) -> TokenBackend:
        """The shared backend behind the in-process tier."""
        return self._shared.backend

    @property
    def tuning(self) -> Tuning:
        return self._tuning

    def __repr__(self) -> str:
        return (
            f"TokenManager(client_id={self._client_id!r}, scope={self._scope!r}, "
            f"auth_url={self._auth_url!r}, backend={self._shared.backend!r})"
        )

    async def header(
        self, scope: str | None = None, *, customer: str | None = None
    ) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}``, a new dict on every call.

        Args:
            scope: overrides the manager's default scope for this call.
            customer: a customer's ``owner_id``: their token (see ``login``), not the
                app's own.

        Raises:
            AuthenticationError: the credentials were rejected.
            LoginRequiredError: (with ``customer``) nothing usable is cached for them.
            TokenEndpointError: no token could be had from the endpoint.
            ConfigurationError: ``scope`` is not a non-empty string or None.
        """
        # Subscripts inside try, not .get() and a None check: on the warm path the
        # exception machinery costs nothing, and the bound-method call it saves is
        # most of the gap to the floor (benchmarks/hot.py).
        if customer is None:
            try:
                return {"Authorization": self._hot_headers[scope]}
            except (KeyError, TypeError):  # TypeError: unhashable, the slow path names it
                arg: ScopeArg = scope
        elif scope is None:
            # A customer's token for the default scope, by owner id alone: no tuple to
            # build and hash on the warm path.
            try:
                return {"Authorization": self._hot_customers[customer]}
            except (KeyError, TypeError):
                arg = (None, customer)
        else:
            arg = (scope, customer)
            try:
                return {"Authorization": self._hot_headers[arg]}
            except (KeyError, TypeError):
                pass
        found = self._lookup(arg)
        if isinstance(found, Token):
            return {"Authorization": found.authorization}
        token = await found
        if self._clock.time() >= token.expires_at:
            token = await self._look_again(arg)
        return {"Authorization": token.authorization}

    async def token(self, scope: str | None = None, *, customer: str | None = None) -> Token:
        """The current ``Token`` for ``scope`` (the manager's default when None), or
        for ``customer``."""
        arg = scope if customer is None else (scope, customer)
        try:
            return self._hot_tokens[arg]
        except (KeyError, TypeError):
            pass
        found = self._lookup(arg)
        if isinstance(found, Token):
            return found
        token = await found
        if self._clock.time() >= token.expires_at:
            token = await self._look_again(arg)
        return token

    async def _look_again(self, arg: ScopeArg) -> Token:
        """For a caller that resumed after its flight's token expired (its loop stalled
        longer than the safety margin): look again, a few times. The check is inline in
        header() and token(), so each waiter of a cold stampede still runs one frame."""
        for _ in range(3):
            found = self._lookup(arg)
            token = found if isinstance(found, Token) else await found
            if self._clock.time() < token.expires_at:
                return token
        raise TokenError(
            "every token this call was given had expired before the call could resume: "
            "the event loop is stalling longer than the tokens' safety margin"
        )

    async def invalidate(
        self, access_token: str, scope: str | None = None, *, customer: str | None = None
    ) -> bool:
        """Drop ``access_token`` from every tier, only if it is still the cached token.

        Call it when the API answers 401 ``INVALID_TOKEN``: a hundred callers that saw
        the same stale token cause one new fetch, not a hundred, and a token another
        caller already replaced is left alone. Returns whether anything was dropped.
        For a customer, the stored refresh token stays: the next call renews with it.
        """
        if not isinstance(access_token, str) or not access_token:
            raise ConfigurationError("access_token must be a non-empty string")
        self._check_open()
        self._bind_loop()
        key, _ = self._resolve(scope if customer is None else (scope, customer))
        # Remember it: a read of the shared backend racing this call must not bring it back.
        self._reject(key, access_token)
        dropped = False
        entry = self._tier.get(key)
        if entry is not None and entry.token.access_token == access_token:
            self._tier.drop(key)
            dropped = True
        # A customer's stored pair keeps its refresh token: deleting it would log them out.
        # Callers that met the same 401 share one delete. One each would open as many
        # backend connections at once: 50 callers per process in the multi-host
        # benchmark, whose deletes then timed out, so the backend was taken for down
        # and processes fetched around it (4 token requests instead of 1).
        deleted = customer is None and await self._deletes.run(
            (key, access_token), partial(self._shared.delete_if, key, access_token)
        )
        if dropped or deleted:
            logger.info("invalidated token %s", fingerprint(access_token))
        return dropped or deleted

    async def aclose(self) -> None:
        """Cancel and await background work; close the session and backend it owns."""
        if self._closed:
            return
        self._closed = True
        metrics.unwatch(self._gauge)
        self._tier.clear_hot()
        self._tier.cancel_timers()
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Any]] = [t for t in self._flights.tasks() if t.get_loop() is loop]
        if self._keeper is not None and self._keeper.get_loop() is loop:
            tasks.append(self._keeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flights.forget()
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None
        if self._owns_backend:
            await self._shared.backend.aclose()

    async def __aenter__(self) -> TokenManager:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the slow path -----------------------------------------------------------------

    def _lookup(self, scope_arg: ScopeArg) -> Token | asyncio.Future[Token]:
        """The slow path: the memory tier's token, or a future for the flight's.

        A plain function, so a caller waiting on a flight runs one coroutine frame (its
        own), not two: that is most of a cold stampede's cost beyond asyncio's own.
        """
        # The checks of _check_open, _bind_loop and _resolve, inlined for their common
        # case: every waiter of a cold stampede passes here.
        if self._closed:
            self._check_open()
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._keeper is None or self._keeper.done():
            self._bind_loop()
        try:
            # A flight this same argument already waits on (the tiers had nothing):
            # join it without resolving the key again. A cold stampede's waiters.
            waiter = self._flights.join_alias(scope_arg)
            if waiter is not None:
                metrics.cache_miss("memory")
                return waiter
            resolved = self._keys.get(scope_arg)
        except TypeError:
            resolved = None
        key, scope = resolved if resolved is not None else self._resolve(scope_arg)
        entry = self._tier.get(key)
        if entry is not None:
            now = self._clock.time()
            mono = self._clock.monotonic()
            if entry.usable(now, mono):
                if entry.due(now, mono):
                    self._start_refresh(key, scope, entry)
                else:
                    self._tier.promote(scope_arg, entry)
                return entry.token
            self._tier.drop(key)
            # Not usable here, whatever the wall clock of the shared copy says (it may
            # have been stepped back): a read of the backend must not bring it back.
            self._reject(key, entry.token.access_token, entry.token.expires_at)
        metrics.cache_miss("memory")
        self._tier.await_flight(key, scope_arg)
        owner = scope_arg[1] if type(scope_arg) is tuple else None
        return self._flights.join_as(key, partial(self._obtain, key, scope, None, owner), scope_arg)

    def _start_refresh(self, key: str, scope: str | None, entry: Entry) -> None:
        """Refresh ``entry`` in the background, at most once per minimum gap."""
        if self._flights.in_flight(key):
            return
        now = self._clock.monotonic()
        if now < entry.refresh_not_before:
            return
        entry.refresh_not_before = now + entry.timing.min_gap
        stale = entry.token
        task = self._flights.start(key, partial(self._obtain, key, scope, stale, stale.owner_id))
        task.add_done_callback(partial(self._refresh_done, entry))

    def _refresh_done(self, entry: Entry, task: asyncio.Task[Token]) -> None:
        """After a failed refresh, wait the minimum gap from its *end*: a refresh slower
        than the gap (timeouts, Retry-After) must not be followed at once by another."""
        if task.cancelled() or task.exception() is not None:
            entry.refresh_not_before = max(
                entry.refresh_not_before, self._clock.monotonic() + entry.timing.min_gap
            )

    async def _obtain(
        self, key: str, scope: str | None, stale: Token | None, owner: str | None
    ) -> Token:
        """The body of a flight: shared tier, then the lock, then the endpoint.

        ``stale`` is the token being refreshed ahead of expiry (None for a blocking
        fetch): a refresh accepts only a newer token than it. ``owner`` is the
        customer's owner id (None for the app's own token): it travels with the flight,
        so no later state (an evicted customer) can turn its renewal into an app fetch.
        """
        try:
            return await self._obtain_or_raise(key, scope, stale, owner)
        except BaseException:
            # Nobody will install a token for this flight's waiters: forget them.
            self._tier.forget_pending(key)
            raise

    async def _obtain_or_raise(
        self, key: str, scope: str | None, stale: Token | None, owner: str | None
    ) -> Token:
        self._cooldowns.raise_if_cooling_down(key)
        self._throttle.raise_if_backing_off(key)
        began = metrics.now()
        outcome = await self._lock_or_token(key, stale)
        metrics.lock_wait(metrics.now() - began)
        if isinstance(outcome, Token):
            return self._install(key, outcome)
        deferred = self._deferrable(key, stale) if outcome is None else None
        if deferred is not None:
            # The shared backend is failing (a failover, a blip): every process that
            # fetched around it now would make its own request. While the token has
            # time to spare, ask the backend again when it may answer (no request went
            # to the endpoint, so the minimum gap does not apply); past the midpoint of
            # the refresh span, an outage that long is no failover, and the refresh
            # fetches around the backend.
            token = self._install(key, deferred.token)
            deferred.refresh_not_before = (
                self._clock.monotonic() + self._tuning.backend_retry_interval
            )
            return token
        released = False
        try:
            # Another process may have failed and set a back-off before it released the
            # lock (a Redis backend read it with the lock: no round trip here).
            await self._throttle.check_shared(key)
            try:
                token = await self._fetch(key, scope, owner, refreshing=stale is not None)
            except TokenEndpointError as error:
                if throttles(error):
                    await self._throttle.enter(key, error)  # before the lock is released
                raise
            self._throttle.succeeded(key)
            if stale is not None and token.access_token == stale.access_token:
                # Reissued with the time *left* as expires_in: keep the original lifetime,
                # so every process computes the same windows from the stored token.
                token = stale
            if self._clock.time() >= token.expires_at - safety_margin(token, self._tuning):
                # A reissued token, or an answer this process took too long to read (a
                # stalled loop): never hand it to a caller that is waiting because the
                # cached one reached its margin.
                left = f"{token.expires_at - self._clock.time():.1f} s left"
                raise TokenEndpointError(
                    f"the token endpoint returned the current token again, with {left}: "
                    "inside the safety margin"
                    if stale is not None and token is stale
                    else f"the token endpoint's answer was read with {left} in its token "
                    "(a slow answer or a stalled event loop): inside the safety margin"
                )
            if outcome is None:
                await self._shared.write(key, token)
            else:
                released = True  # whatever happens: write_and_release always releases
                await self._shared.write_and_release(key, token, outcome)
        finally:
            if outcome is not None and not released:
                await self._shared.release(outcome)
        if stale is not None and token.access_token == stale.access_token:
            logger.info(
                "token endpoint returned the same token %s; the next refresh waits the minimum gap",
                fingerprint(token.access_token),
            )
        return self._install(key, token)

    def _deferrable(self, key: str, stale: Token | None) -> Entry | None:
        """The entry of ``stale`` if its refresh, which could not use the shared backend,
        may wait: before the midpoint between its refresh moment and its margin."""
        entry = self._tier.get(key)
        if stale is None or entry is None or entry.token.access_token != stale.access_token:
            return None
        timing = entry.timing
        if self._clock.time() >= (timing.refresh_at + timing.usable_until) / 2:
            return None
        return entry

    def _acceptable(self, key: str, token: Token | None, stale: Token | None) -> bool:
        if token is None:
            return False
        rejected = self._rejected.get(key)
        if rejected is not None and token.access_token == rejected[0]:
            return False
        if self._clock.time() >= token.expires_at - safety_margin(token, self._tuning):
            return False
        if stale is None:
            return True
        return token.access_token != stale.access_token and token.expires_at > stale.expires_at

    async def _fetch(
        self, key: str, scope: str | None, owner: str | None, *, refreshing: bool
    ) -> Token:
        began = metrics.now()
        try:
            if owner is not None:
                return await self._renew(key, scope, owner)
            return await self._fetch_once(key, scope, refreshing=refreshing)
        finally:
            metrics.fetch_duration(metrics.now() - began)

    async def _fetch_once(self, key: str, scope: str | None, *, refreshing: bool) -> Token:
        tuning = self._tuning
        try:
            token = await with_retries(
                partial(self._endpoint.request, scope),
                attempts=tuning.attempts,
                attempt_timeout=tuning.attempt_timeout,
                deadline=tuning.fetch_deadline,
                base=tuning.backoff_base,
                cap=tuning.backoff_cap,
                clock=self._clock,
                rng=self._rng,
            )
        except AuthenticationError as error:
            self._cooldowns.enter(key, error)
            logger.warning(
                "token request for client %r rejected: %s; calls fail fast for %g s",
                self._client_id,
                error,
                tuning.auth_failure_cooldown,
            )
            raise
        except TokenError as error:
            if refreshing:
                logger.warning(
                    "background token refresh failed (%s); the current token is still served",
                    error,
                )
            raise
        logger.info(
            "fetched token %s for scope %r, valid for %.0f s",
            fingerprint(token.access_token),
            token.scope,
            token.lifetime,
        )
        return token

    # -- the tiers ---------------------------------------------------------------------

    def _reject(self, key: str, access_token: str, expires_at: float | None = None) -> None:
        if expires_at is None:
            entry = self._tier.get(key)
            if entry is not None and entry.token.access_token == access_token:
                expires_at = entry.token.expires_at
            else:  # unknown expiry: kept for the longest a Commerce Layer token lives
                expires_at = self._clock.time() + 4 * 3600
        self._rejected[key] = (access_token, expires_at)

    def _forget_idle(self) -> None:
        forget_idle(self)

    def _resolve(self, scope_arg: object) -> tuple[str, str | None]:
        """(cache key, scope) for a scope argument (or a (scope, customer) pair),
        validated once and remembered."""
        try:
            known = self._keys.get(scope_arg)  # type: ignore[call-overload]
        except TypeError:
            known = None
        if known is not None:
            return known  # type: ignore[no-any-return]
        owner: str | None = None
        pair = scope_arg  # kept as the key below: a second equal tuple is 56 B a customer
        if isinstance(scope_arg, tuple) and len(scope_arg) == 2:
            scope_arg, owner = scope_arg
            if not isinstance(owner, str) or not owner or len(owner) > 256:
                raise ConfigurationError(
                    "customer must be a customer's owner_id: a non-empty string"
                )
        if scope_arg is None:
            scope = self._scope
        elif isinstance(scope_arg, str) and scope_arg.strip() == scope_arg and scope_arg:
            scope = scope_arg
        else:
            raise ConfigurationError(
                "scope must be a non-empty string without surrounding spaces, such as "
                f"'market:code:europe', or None; got {type(scope_arg).__name__} {scope_arg!r}"
            )
        if owner is None:
            resolved = (self._credential.key(scope), scope)
            self._keys[scope_arg] = resolved
            return resolved
        resolved = (self._credential.key(scope, owner), scope)
        self._keys[pair if type(pair) is tuple else (scope_arg, owner)] = resolved
        return resolved

    # -- event loop and resources ------------------------------------------------------

    def _bind_loop(self) -> None:
        bind_loop(self)

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    def _check_open(self) -> None:
        if self._closed:
            raise TokenError("this TokenManager is closed")

    def _after_fork_in_child(self) -> None:
        reset_after_fork(self)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        warn_unclosed(self, _warn)
