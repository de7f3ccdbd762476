"""How shared backends turn a ``Token`` into bytes and back.

The stored value is the JSON of ``Token.to_dict()`` inside a versioned envelope
(``{"v": 1, "token": {...}}``), optionally encrypted with Fernet. Only token fields are
stored, never a client secret. Decoding never raises: junk, a truncated write, an
unknown version or a value sealed with another key is a miss (``None``), so a bad
entry costs one token request, not an outage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from .._errors import ConfigurationError
from .._token import Token

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

__all__ = ["EncryptionKey", "FernetCodec", "JSONCodec", "make_codec"]

#: One Fernet key (url-safe base64 of 32 bytes), or several: the first encrypts, all
#: decrypt, so keys can be rotated without losing the tokens already stored.
EncryptionKey: TypeAlias = str | bytes | Sequence[str | bytes]

_VERSION = 1


class JSONCodec:
    """Plain JSON: readable by anyone who can read the store."""

    encrypted: bool = False

    def encode(self, token: Token) -> bytes:
        """The bytes to store for ``token``.

        Args:
            token: the token to store.
        """
        envelope = {"v": _VERSION, "token": token.to_dict()}
        return json.dumps(envelope, separators=(",", ":")).encode()

    def decode(self, data: bytes) -> Token | None:
        """The stored token, or None if ``data`` is not one this codec wrote.

        Args:
            data: bytes as ``encode`` returned them (or anything else).
        """
        try:
            envelope: Any = json.loads(data)
            if not isinstance(envelope, dict) or envelope.get("v") != _VERSION:
                return None
            return Token.from_dict(envelope.get("token"))
        # RecursionError: deeply nested junk; OverflowError: a number too big for a float
        # (a 400-digit created_at); the others: anything not a stored token.
        except (ValueError, TypeError, RecursionError, OverflowError):
            return None


class FernetCodec(JSONCodec):
    """JSON sealed with Fernet (AES-128-CBC + HMAC-SHA256): unreadable and tamper-evident
    without the key.

    Args:
        key: one Fernet key, or several for rotation (the first encrypts).

    Raises:
        ConfigurationError: ``cryptography`` is not installed, or a key is malformed.
    """

    encrypted = True

    def __init__(self, key: EncryptionKey) -> None:
        self._fernet = _load_fernet(key)

    def encode(self, token: Token) -> bytes:
        return self._fernet.encrypt(super().encode(token))

    def decode(self, data: bytes) -> Token | None:
        from cryptography.fernet import InvalidToken

        try:
            plain = self._fernet.decrypt(data)
        # TypeError/ValueError: data that is not even Fernet-shaped (e.g. not ASCII).
        except (InvalidToken, TypeError, ValueError):
            return None
        return super().decode(plain)


def make_codec(encryption_key: EncryptionKey | None) -> JSONCodec:
    """The codec for a backend: Fernet with a key, plain JSON without.

    Args:
        encryption_key: Fernet key(s), or None to store plain JSON.
    """
    if encryption_key is None:
        return JSONCodec()
    return FernetCodec(encryption_key)


def _load_fernet(key: EncryptionKey) -> MultiFernet:
    try:
        from cryptography.fernet import Fernet, MultiFernet
    except ImportError:
        raise ConfigurationError(
            "encryption_key needs the cryptography package: pip install 'cl-tokens[encryption]'"
        ) from None
    keys = [key] if isinstance(key, (str, bytes)) else list(key)
    if not keys:
        raise ConfigurationError("encryption_key is an empty list; give at least one key")
    fernets = []
    for position, one in enumerate(keys):
        try:
            fernets.append(Fernet(one))
        # Never echo the key: say which one is wrong and what a good one looks like.
        except (ValueError, TypeError):
            raise ConfigurationError(
                f"encryption key #{position + 1} is not a Fernet key (url-safe base64 of "
                "32 bytes; make one with cryptography.fernet.Fernet.generate_key())"
            ) from None
    return MultiFernet(fernets)
