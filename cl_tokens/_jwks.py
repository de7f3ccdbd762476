"""Optional signature verification of Commerce Layer JWTs (the ``jwt`` extra).

Commerce Layer signs its tokens with RS512 and publishes the public keys at
``{iss}/.well-known/jwks.json``. Verifying is for code that *receives* tokens and must
trust their claims; a client that only sends its own tokens does not need it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from collections.abc import Iterable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

from ._clock import Clock, SystemClock
from ._endpoint import auth_url_problem
from ._errors import ConfigurationError, TokenError
from ._http import BodyTooLarge, loads_json, read_body, safe_text
from ._token import MAX_TOKEN_LENGTH, Token

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = ["COMMERCE_LAYER_ISSUER", "JWKSVerifier"]

COMMERCE_LAYER_ISSUER = "https://auth.commercelayer.io"
# Old tokens say "https://commercelayer.io", or nothing; their keys are the auth host's.
_LEGACY_ISSUERS = frozenset({"https://commercelayer.io", ""})
_MIN_REFETCH = 30.0  # seconds: unknown kids must not turn into a flood of JWKS requests


class JWKSVerifier:
    """Verifies a token's RS512 signature and expiry against its issuer's JWKS.

    The issuer comes from the token's ``iss`` claim, so it must be one you trust:
    anyone can mint a token naming their own server, whose keys would then "verify" it.
    Keys are cached by issuer and ``kid`` for ``cache_ttl`` seconds; a token with an
    unknown ``kid`` refetches the set (at most every 30 s), so key rotation just works.

    Args:
        session: an ``aiohttp.ClientSession`` to fetch keys with (not closed here);
            otherwise one is created when first needed and closed by ``aclose()``.
        cache_ttl: seconds a fetched key set is used before it is fetched again.
        issuers: the ``iss`` values trusted; default ``https://auth.commercelayer.io``.
            Each must be https (plain http only to a loopback host, for tests).
        timeout: seconds a JWKS request may take.
        leeway: seconds of clock skew tolerated when checking ``exp``.
        failure_ttl: seconds a failed key-set fetch is remembered: meanwhile every
            verify that needs that issuer's keys fails at once with the same error,
            and no request is sent (a down or hung endpoint costs one request per
            ``failure_ttl``, not one per verify).
        clock: where the current time comes from (for tests).

    Raises:
        ConfigurationError: an argument is invalid.
        ImportError: cryptography is missing (``pip install 'cl-tokens[jwt]'``).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        cache_ttl: float = 3600.0,
        issuers: Iterable[str] = (COMMERCE_LAYER_ISSUER,),
        timeout: float = 10.0,
        leeway: float = 0.0,
        failure_ttl: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        try:
            import cryptography  # noqa: F401 - fail at construction, not at first verify
        except ImportError:
            raise ImportError(
                "JWKSVerifier needs cryptography: pip install 'cl-tokens[jwt]'"
            ) from None
        if isinstance(issuers, str):
            raise ConfigurationError("issuers must be a list of URLs, not a string")
        trusted = {str(i).rstrip("/") for i in issuers}
        problems = [f"issuer {i!r} {p}" for i in sorted(trusted) if (p := auth_url_problem(i))]
        if not trusted:
            problems.append("issuers must name at least one issuer")
        if not (cache_ttl >= 0 and timeout > 0 and leeway >= 0 and failure_ttl >= 0):
            problems.append("cache_ttl, leeway and failure_ttl must be >= 0, timeout > 0")
        if problems:
            raise ConfigurationError("invalid JWKSVerifier arguments: " + "; ".join(problems))
        self._issuers = frozenset(trusted)
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._cache_ttl = cache_ttl
        self._timeout = timeout
        self._leeway = leeway
        self._failure_ttl = failure_ttl
        self._clock: Clock = clock or SystemClock()
        # issuer -> (monotonic time fetched, {kid: key})
        self._keys: dict[str, tuple[float, dict[str, RSAPublicKey]]] = {}
        # issuer -> the one fetch in flight, awaited by every verify that needs it
        self._flights: dict[str, asyncio.Future[dict[str, RSAPublicKey]]] = {}
        # issuer -> (monotonic time until which the failure stands, its message)
        self._failures: dict[str, tuple[float, str]] = {}

    async def verify(self, token: Token | str) -> dict[str, Any]:
        """The token's payload, once its issuer, ``exp`` and signature are checked.

        Args:
            token: a ``Token`` or the bare access token string.

        Raises:
            TokenError: the token is not a JWT, names an untrusted issuer or an unknown
                key, has expired, or its signature does not match; or the key set could
                not be fetched. The message never holds the token.
        """
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access_token = token.access_token if isinstance(token, Token) else token
        header, payload, signing_input, signature = _split(access_token)
        alg = header.get("alg")
        if alg != "RS512":
            # Never let the token pick the algorithm ("none", HS512 with the public key...).
            raise TokenError(f"token signed with {_quoted(alg)}; only RS512 is accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("token header has no key id (kid)")
        issuer = _issuer(payload)
        if issuer not in self._issuers:
            raise TokenError(
                f"token issuer {_quoted(issuer)} is not trusted (trusted: {sorted(self._issuers)})"
            )
        exp = _finite(payload.get("exp"))
        if exp is None:
            raise TokenError("token has no numeric exp claim (or one too large)")
        if self._clock.time() >= exp + self._leeway:
            raise TokenError("token has expired")
        key = await self._key(issuer, kid)
        try:
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA512())
        except InvalidSignature:
            raise TokenError("token signature does not match its issuer's key") from None
        return payload

    async def _key(self, issuer: str, kid: str) -> RSAPublicKey:
        cached = self._keys.get(issuer)
        now = self._clock.monotonic()
        fresh = cached is not None and now - cached[0] < self._cache_ttl
        if cached is not None and fresh and kid in cached[1]:
            return cached[1][kid]
        if cached is not None and fresh and now - cached[0] < _MIN_REFETCH:
            keys = cached[1]  # an unknown kid, and the set was fetched moments ago
        else:
            keys = await self._keys_of(issuer)
        key = keys.get(kid)
        if key is None:
            raise TokenError(f"no key {_quoted(kid)} in the key set of {issuer}")
        return key

    async def _keys_of(self, issuer: str) -> dict[str, RSAPublicKey]:
        """The issuer's key set, fetched once however many verifies wait for it.

        A failed fetch is remembered for ``failure_ttl`` seconds: until then every
        caller gets its error at once, and no request is sent.
        """
        failed = self._failures.get(issuer)
        now = self._clock.monotonic()
        if failed is not None:
            if now < failed[0]:
                raise TokenError(
                    f"{failed[1]} (remembered for {self._failure_ttl:g} s; no request sent)"
                )
            del self._failures[issuer]
        flight = self._flights.get(issuer)
        loop = asyncio.get_running_loop()
        if flight is None or flight.get_loop() is not loop:
            flight = loop.create_task(self._fetch_and_remember(issuer))
            self._flights[issuer] = flight
            flight.add_done_callback(partial(self._landed, issuer))
        # shield: a cancelled caller leaves the fetch running for the others.
        return await asyncio.shield(flight)

    def _landed(self, issuer: str, flight: asyncio.Future[dict[str, RSAPublicKey]]) -> None:
        if self._flights.get(issuer) is flight:
            del self._flights[issuer]
        if not flight.cancelled():
            flight.exception()  # retrieved: no "never retrieved" warning if all left

    async def _fetch_and_remember(self, issuer: str) -> dict[str, RSAPublicKey]:
        try:
            keys = await self._fetch(issuer)
        except TokenError as exc:
            if self._failure_ttl > 0:
                until = self._clock.monotonic() + self._failure_ttl
                self._failures[issuer] = (until, str(exc))
            raise
        self._keys[issuer] = (self._clock.monotonic(), keys)
        return keys

    async def _fetch(self, issuer: str) -> dict[str, RSAPublicKey]:
        url = f"{issuer}/.well-known/jwks.json"
        session = await self._get_session()
        try:
            async with session.get(
                url,
                headers={"Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                allow_redirects=False,
                # A caller's session must not raise on its own, nor add its headers
                # (our own middleware would attach a token) to this request.
                raise_for_status=False,
                middlewares=(),
            ) as response:
                status = response.status
                raw = await read_body(response) if status == 200 else b""
        except BodyTooLarge as exc:
            raise TokenError(f"could not fetch {url}: {exc}") from None
        except asyncio.TimeoutError:
            raise TokenError(f"{url} did not answer within {self._timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise TokenError(
                f"could not fetch {url}: {type(exc).__name__}: {safe_text(str(exc))}"
            ) from None
        if status != 200:
            raise TokenError(f"could not fetch {url}: HTTP {status}")
        try:
            data = loads_json(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise TokenError(f"{url} is not a JSON Web Key Set")
        return _rsa_keys(data["keys"])

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    async def aclose(self) -> None:
        """Close the session this verifier created (not one it was given)."""
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None

    async def __aenter__(self) -> JWKSVerifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"JWKSVerifier(issuers={sorted(self._issuers)!r})"


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _split(access_token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, payload, signing input, signature) of a compact JWS."""
    parts = access_token.split(".") if isinstance(access_token, str) else []
    if len(parts) != 3:
        raise TokenError("not a JWT: expected three dot-separated parts")
    if len(access_token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"not a JWT: longer than {MAX_TOKEN_LENGTH} characters")
    try:
        header = loads_json(_b64decode(parts[0]))
        payload = loads_json(_b64decode(parts[1]))
        signature = _b64decode(parts[2])
    except (binascii.Error, ValueError):
        # loads_json turns depth, NaN and number faults into ValueError as well.
        raise TokenError("not a JWT: a part is not base64url-encoded JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenError("not a JWT: header and payload must be JSON objects")
    return header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def _quoted(value: object) -> str:
    """A value from a token, fit for a message: repr, escaped, cut short."""
    return safe_text(repr(value), 80)


def _finite(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (bools, huge ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _issuer(payload: dict[str, Any]) -> str:
    iss = payload.get("iss")
    iss = iss.rstrip("/") if isinstance(iss, str) else ""
    return COMMERCE_LAYER_ISSUER if iss in _LEGACY_ISSUERS else iss


def _rsa_keys(jwks: list[Any]) -> dict[str, RSAPublicKey]:
    """{kid: key} of the RSA signing keys in a key set; other keys are skipped."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    keys: dict[str, RSAPublicKey] = {}
    for jwk in jwks:
        if not isinstance(jwk, dict):
            continue
        kid, n, e = jwk.get("kid"), jwk.get("n"), jwk.get("e")
        if not (isinstance(kid, str) and isinstance(n, str) and isinstance(e, str)):
            continue
        if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
            continue
        try:
            numbers = RSAPublicNumbers(
                int.from_bytes(_b64decode(e), "big"), int.from_bytes(_b64decode(n), "big")
            )
            keys[kid] = numbers.public_key()
        except (binascii.Error, ValueError, TypeError, OverflowError):
            continue  # not a usable RSA key: skipped like any other kind
    return keys
