"""The token model: what the endpoint gave us, with absolute expiry, and its claims."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_TOKEN_LENGTH", "Token", "TokenClaims", "fingerprint", "token_value_problem"]

#: Longer than any Commerce Layer JWT (about 1-2 KB) by far, short enough that a
#: hostile endpoint or store cannot make every request carry a huge header.
MAX_TOKEN_LENGTH = 16 * 1024

# RFC 6750 section 2.1, b64token: what may follow "Bearer " in a header. Anything
# else (CR/LF, spaces, non-ASCII) would let a value forge headers or break clients.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def refresh_token_problem(refresh_token: object) -> str | None:
    """Why ``refresh_token`` cannot be stored and sent back, or None (never quoting it)."""
    if not isinstance(refresh_token, str) or not refresh_token:
        return "refresh_token is not a non-empty string"
    if len(refresh_token) > 4096:
        return "refresh_token is longer than 4096 characters"
    if _B64TOKEN.fullmatch(refresh_token) is None:
        return "refresh_token has characters a token may not contain"
    return None


def token_value_problem(access_token: object, token_type: object) -> str | None:
    """Why ``access_token``/``token_type`` cannot go into an Authorization header, or None.

    The access token must be an RFC 6750 b64token of at most ``MAX_TOKEN_LENGTH``
    characters; the type must be ``Bearer`` in any case. The message never quotes the
    value (it may be a real token).
    """
    if not isinstance(access_token, str) or not access_token:
        return "access_token is missing or empty"
    if len(access_token) > MAX_TOKEN_LENGTH:
        return f"access_token is longer than {MAX_TOKEN_LENGTH} characters"
    if _B64TOKEN.fullmatch(access_token) is None:
        return "access_token has characters a bearer token may not contain (RFC 6750 b64token)"
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        return "token_type is not Bearer"
    return None


def fingerprint(secret: str | None) -> str:
    """A short, non-reversible hint of a secret for logs: its last four characters."""
    if not secret:
        return "<none>"
    if len(secret) <= 8:
        return "…"
    return "…" + secret[-4:]


@dataclass(frozen=True)
class TokenClaims(Mapping[str, Any]):
    """The unverified payload of a Commerce Layer JWT, with typed helpers.

    Commerce Layer puts ``organization`` (``slug``, ``id``), ``application``
    (``kind``, ``id``, ``public``), ``market`` (``id`` list), ``scope``, ``exp`` and
    ``iss`` there. Nothing here is verified: use it to route, never to authorize.
    """

    payload: dict[str, Any]

    # A read-only Mapping over the payload: claims["organization"]["slug"] works too.
    def __getitem__(self, name: str) -> Any:
        return self.payload[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.payload)

    def __len__(self) -> int:
        return len(self.payload)

    def _section(self, name: str) -> dict[str, Any]:
        value = self.payload.get(name)
        return value if isinstance(value, dict) else {}

    @property
    def organization_slug(self) -> str | None:
        slug = self._section("organization").get("slug")
        return slug if isinstance(slug, str) else None

    @property
    def organization_id(self) -> str | None:
        value = self._section("organization").get("id")
        return value if isinstance(value, str) else None

    @property
    def application_kind(self) -> str | None:
        kind = self._section("application").get("kind")
        return kind if isinstance(kind, str) else None

    @property
    def market_ids(self) -> tuple[str, ...]:
        ids = self._section("market").get("id")
        if isinstance(ids, str):
            return (ids,)
        if isinstance(ids, list):
            return tuple(str(i) for i in ids)
        return ()

    @property
    def iss(self) -> str | None:
        value = self.payload.get("iss")
        return value if isinstance(value, str) else None

    @property
    def exp(self) -> float | None:
        value = self.payload.get("exp")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return None

    @staticmethod
    def _is_host_name(text: str) -> bool:
        """Whether ``text`` is dot-separated ASCII labels of letters, digits and hyphens."""
        labels = text.split(".")
        return all(
            label
            and label.isascii()
            and label.replace("-", "").isalnum()
            and not label.startswith("-")
            and not label.endswith("-")
            for label in labels
        )

    @property
    def _api_domain(self) -> str:
        """The domain of the Commerce Layer APIs that issued the token.

        Taken from an ``iss`` of the form ``https://auth.<domain>`` (as Commerce Layer's
        own js-auth does), else ``commercelayer.io``: old tokens carry
        ``https://commercelayer.io`` or no ``iss`` at all, and test servers a loopback one.
        """
        iss = self.iss
        prefix = "https://auth."
        if iss is not None and iss.startswith(prefix):
            domain = iss[len(prefix) :].rstrip("/").lower()
            if self._is_host_name(domain) and "." in domain:
                return domain
        return "commercelayer.io"

    @property
    def core_api_url(self) -> str | None:
        """The Core API base URL, ``https://<organization slug>.commercelayer.io``.

        None when the token names no organization (e.g. a provisioning token) or its
        slug is not a plain host label.
        """
        slug = self.organization_slug
        # The slug becomes part of a host name: anything but a plain label would let the
        # token steer requests (and their Authorization header) somewhere else.
        if slug is None or "." in slug or not self._is_host_name(slug):
            return None
        return f"https://{slug.lower()}.{self._api_domain}"

    @property
    def provisioning_api_url(self) -> str:
        """The Provisioning API base URL, ``https://provisioning.commercelayer.io``."""
        return f"https://provisioning.{self._api_domain}"


def decode_claims(access_token: str) -> TokenClaims | None:
    """Decode a JWT's payload without verifying it; None for an opaque token."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload = json.loads(raw)
    # RecursionError: a payload nested deeper than the parser's stack allows.
    except (binascii.Error, ValueError, RecursionError):
        return None
    return TokenClaims(payload) if isinstance(payload, dict) else None


# slots: one token per cached scope or customer; a __dict__ would double its size.
@dataclass(frozen=True, slots=True)
class Token:
    """An access token and when it stops being usable.

    Attributes:
        access_token: the bearer token (never shown by ``repr``).
        token_type: as the server said, normally ``"Bearer"``.
        scope: the scope the server granted; else the scope requested; else None.
        expires_at: unix time (seconds) at which the token expires, computed from the
            local clock when the request was *sent* plus ``expires_in``: conservative.
        created_at: the server's ``created_at`` (unix seconds), informational only.
        lifetime: ``expires_in`` as received, in seconds; the refresh window and the
            safety margin are fractions of it, so every process computes the same ones.
            0 when unknown: the margin and window then apply unclamped.
        seal: the MAC a shared backend's value carries (see ``_keys``); None for a
            token fresh from the endpoint or from a store without MACs.
        refresh_token: a customer token's refresh token (never shown by ``repr``);
            single-use: Commerce Layer rotates it on every renewal.
        refresh_expires_at: until when the refresh token may be used (unix seconds);
            stores keep a customer's entry until then.
        owner_id: the customer (or user) the token acts for; None for the app's own.
        owner_type: ``"Customer"`` or ``"User"``; None for the app's own token.
        refresh_sent: when (unix seconds) a process sent ``refresh_token`` to renew the
            pair, which it marks in the store first: an in-flight mark, telling the
            fleet that this refresh token may be spent and must never be sent again.
    """

    access_token: str = field(repr=False)
    token_type: str
    scope: str | None
    expires_at: float
    created_at: float | None = None
    lifetime: float = 0.0
    seal: str | None = field(default=None, repr=False, compare=False)
    refresh_token: str | None = field(default=None, repr=False)
    refresh_expires_at: float | None = None
    owner_id: str | None = None
    owner_type: str | None = None
    refresh_sent: float | None = None
    # The token is kept once, as its header value ("Bearer <token>"): what the hot path
    # serves, and thousands of callers woken by one fetch read. ``access_token`` is a
    # view of it (see _access_token below), set through it by __init__.
    _authorization: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self._authorization, str):
            raise ValueError("access_token is missing or empty")
        problem = token_value_problem(self.access_token, self.token_type)
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(self.expires_at, float | int) or not math.isfinite(self.expires_at):
            raise ValueError("expires_at must be a finite number")
        if self.refresh_token is not None:
            problem = refresh_token_problem(self.refresh_token)
            if problem is not None:
                raise ValueError(problem)
        for name in ("owner_id", "owner_type"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, str)
                or not value
                or len(value) > 256
                or not value.isprintable()
            ):
                raise ValueError(f"{name} must be a printable string of at most 256 characters")
        if self.refresh_sent is not None and (
            not isinstance(self.refresh_sent, float | int) or not math.isfinite(self.refresh_sent)
        ):
            raise ValueError("refresh_sent must be a finite number")
        if not self.lifetime > 0:
            # Unknown (tokens built by hand may omit it): margins then apply unclamped.
            object.__setattr__(self, "lifetime", 0.0)
        # One shared string for the few values every token repeats ("bearer",
        # "customer"), not one per token.
        object.__setattr__(self, "token_type", sys.intern(self.token_type))
        if self.owner_type is not None:
            object.__setattr__(self, "owner_type", sys.intern(self.owner_type))

    def __repr__(self) -> str:
        return (
            f"Token(access_token={fingerprint(self.access_token)!r}, "
            f"token_type={self.token_type!r}, scope={self.scope!r}, "
            f"expires_at={self.expires_at!r}, lifetime={self.lifetime!r})"
        )

    @property
    def authorization(self) -> str:
        """The value of the ``Authorization`` header: ``Bearer <token>``.

        The very string the token is kept as: every caller reads the same one.
        """
        return self._authorization

    @property
    def claims(self) -> TokenClaims | None:
        """The decoded (unverified) JWT payload, or None for an opaque token."""
        return decode_claims(self.access_token)

    @property
    def core_api_url(self) -> str | None:
        """``claims.core_api_url``: None for an opaque token or one without organization."""
        claims = self.claims
        return claims.core_api_url if claims is not None else None

    @property
    def provisioning_api_url(self) -> str | None:
        """``claims.provisioning_api_url``: None for an opaque token."""
        claims = self.claims
        return claims.provisioning_api_url if claims is not None else None

    @property
    def keep_until(self) -> float:
        """Until when a store keeps this token: its expiry, or for a customer token the
        refresh token's, which outlives it (the pair renews the access token)."""
        if self.refresh_token is not None and self.refresh_expires_at is not None:
            return max(self.expires_at, self.refresh_expires_at)
        return self.expires_at

    def seconds_left(self, now: float) -> float:
        return self.expires_at - now

    def to_dict(self) -> dict[str, Any]:
        """The token's fields as JSON-ready data (what shared backends store)."""
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "scope": self.scope,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "lifetime": self.lifetime,
            "seal": self.seal,
            "refresh_token": self.refresh_token,
            "refresh_expires_at": self.refresh_expires_at,
            "owner_id": self.owner_id,
            "owner_type": self.owner_type,
            "refresh_sent": self.refresh_sent,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Token:
        """Rebuild a token stored by ``to_dict``; ValueError if the data is not one."""
        if not isinstance(data, dict):
            raise ValueError("stored token is not an object")
        try:
            access_token = data["access_token"]
            expires_at = float(data["expires_at"])
            lifetime = float(data.get("lifetime") or 0.0)
            created = data.get("created_at")
            token_type = data.get("token_type") or "Bearer"
            scope = data.get("scope")
            seal = data.get("seal")
            refresh = data.get("refresh_token")
            refresh_until = data.get("refresh_expires_at")
            refresh_expires_at = None if refresh_until is None else float(refresh_until)
            owner_id = data.get("owner_id")
            owner_type = data.get("owner_type")
            sent = data.get("refresh_sent")
            refresh_sent = None if sent is None else float(sent)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"stored token is incomplete: {type(exc).__name__}") from None
        if not isinstance(token_type, str) or (scope is not None and not isinstance(scope, str)):
            raise ValueError("stored token has fields of the wrong type")
        if seal is not None and (not isinstance(seal, str) or len(seal) > 128):
            raise ValueError("stored token has a malformed seal")
        return cls(
            access_token=access_token,
            token_type=token_type,
            scope=scope,
            expires_at=expires_at,
            created_at=float(created) if isinstance(created, (int, float)) else None,
            lifetime=lifetime,
            seal=seal,
            refresh_token=refresh,
            refresh_expires_at=refresh_expires_at,
            owner_id=owner_id,
            owner_type=owner_type,
            refresh_sent=refresh_sent,
        )


def _get_access_token(self: Token) -> str:
    return self._authorization[7:]


def _set_access_token(self: Token, value: object) -> None:
    # Commerce Layer answers token_type "bearer" or "Bearer"; RFC 6750 says "Bearer",
    # and the value is validated as a b64token by __post_init__ (a non-string is kept
    # as is for it to refuse).
    header = f"Bearer {value}" if isinstance(value, str) else value
    object.__setattr__(self, "_authorization", header)


# The dataclass field stays (fields(), replace(), ==, the constructor's keyword); its
# value lives in _authorization, so a token costs its length once, not twice.
# (setattr: mypy reads the assignment as a class variable clashing with the slot.)
setattr(  # noqa: B010
    Token,
    "access_token",
    property(_get_access_token, _set_access_token, doc="The bearer token (never in a repr)."),
)
