"""Cache keys and the MAC of stored values, both bound to the credentials.

A key names one credential exactly: auth URL, client id, scope, owner (customer tokens)
and, for credentials that have one, the client secret. Parts are length-prefixed, so no
two different tuples encode alike (a ``\\x1f`` inside a client id cannot shift a part
into its neighbour). The secret enters only through scrypt, salted by the auth URL and
client id: whoever reads a key (a Redis ``KEYS``, a directory listing) can neither
recover the secret nor test guesses of it cheaply. The same derivation gives the key
that MACs the values this credential stores, so a value planted or altered by anyone
without the secret is a miss, never a token.

Credentials without a secret (sales channel) get a key of the public parts only, in
another domain (they never meet a secret's key), and no MAC: anyone who knows the
client id can make the same key. Configure ``encryption_key`` for those.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from ._token import Token

__all__ = ["KEY_PREFIX", "CredentialKeys", "cache_key", "credential_keys"]

KEY_PREFIX = "cl_tokens:v2:"

# scrypt at n=2**12, r=8: 4 MB and about 20 ms, once per credential per process (it
# runs in the constructor, on the loop); a guess costs an attacker the same.
_SCRYPT = {"n": 2**12, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


def encode_parts(*parts: str | float | None) -> bytes:
    """An injective encoding: each part tagged by its kind and prefixed by its length."""
    out = bytearray()
    for part in parts:
        if part is None:
            out += b"N"
            continue
        if isinstance(part, float | int):
            raw, tag = float(part).hex().encode(), b"F"
        else:
            raw, tag = part.encode("utf-8", "surrogatepass"), b"S"
        out += tag + len(raw).to_bytes(8, "big") + raw
    return bytes(out)


@lru_cache(maxsize=256)
def _master(auth_url: str, client_id: str, client_secret: str) -> bytes:
    salt = hashlib.sha256(encode_parts("cl_tokens/v2/salt", auth_url, client_id)).digest()
    return hashlib.scrypt(client_secret.encode("utf-8", "surrogatepass"), salt=salt, **_SCRYPT)


@dataclass(frozen=True, eq=False)
class CredentialKeys:
    """Keys and MACs for one credential (auth URL, client id, secret)."""

    auth_url: str
    client_id: str
    _master: bytes | None  # None: no secret, so no MAC

    def __repr__(self) -> str:
        return f"CredentialKeys(client_id={self.client_id!r}, mac={self._master is not None})"

    @property
    def authenticated(self) -> bool:
        """Whether stored values are MAC'd (the credential has a secret)."""
        return self._master is not None

    def key(self, scope: str | None, owner: str | None = None) -> str:
        """The cache key of this credential's token for ``scope`` (and ``owner``)."""
        parts = encode_parts("key", self.auth_url, self.client_id, scope, owner)
        if self._master is None:
            digest = hashlib.sha256(b"cl_tokens/v2/public" + parts).hexdigest()
        else:
            digest = hmac.new(self._master, parts, hashlib.sha256).hexdigest()
        return KEY_PREFIX + digest

    def seal(self, key: str, token: Token) -> str | None:
        """The MAC of ``token`` stored under ``key``; None without a secret."""
        if self._master is None:
            return None
        material = encode_parts(
            "token",
            key,
            token.access_token,
            token.token_type,
            token.scope,
            token.expires_at,
            token.created_at,
            token.lifetime,
            token.refresh_token,
            token.refresh_expires_at,
            token.owner_id,
            token.owner_type,
        )
        if token.refresh_sent is not None:
            # Only when present: the seals of values stored without the mark still hold.
            material += encode_parts(token.refresh_sent)
        return hmac.new(self._master, material, hashlib.sha256).hexdigest()

    def verify(self, key: str, token: Token) -> bool:
        """Whether ``token`` read from ``key`` carries this credential's MAC."""
        if self._master is None:
            return True
        expected = self.seal(key, token)
        return token.seal is not None and hmac.compare_digest(token.seal, expected or "")


def credential_keys(auth_url: str, client_id: str, client_secret: str | None) -> CredentialKeys:
    """The ``CredentialKeys`` of a credential (scrypt runs once per process for each)."""
    master = None if client_secret is None else _master(auth_url, client_id, client_secret)
    return CredentialKeys(auth_url, client_id, master)


def cache_key(
    auth_url: str, client_id: str, scope: str | None, client_secret: str | None = None
) -> str:
    """The cache key of a credential's token for ``scope``."""
    return credential_keys(auth_url, client_id, client_secret).key(scope)
