"""The fake server's signing key and socket: an RSA key per process, its JWK, RS512.

The key set a ``JWKSVerifier`` fetches is ``{"keys": [jwk()]}``; without cryptography
there is no key, and tokens carry a random signature of the same shape.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["jwks", "listening_socket", "make_jwt", "signing_key"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64_int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


_Signer = tuple["RSAPrivateKey", str, dict[str, str]]
_KEY_LOCK = threading.Lock()
_KEY: list[_Signer] = []


def signing_key() -> _Signer | None:
    """(private key, kid, public JWK), generated once per process (every server signs
    with it and serves it); None without cryptography. 2048 bits: about 0.1 s to
    generate, 1 ms a signature."""
    if _KEY:
        return _KEY[0]
    try:
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        return None
    with _KEY_LOCK:
        if not _KEY:
            _KEY.append(_new_signer(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    return _KEY[0]


def _new_signer(key: RSAPrivateKey) -> _Signer:
    numbers = key.public_key().public_numbers()
    n, e = _b64_int(numbers.n), _b64_int(numbers.e)
    # The kid: RFC 7638's thumbprint, the SHA-256 of the required members in order.
    thumbprint = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"))
    kid = _b64(hashlib.sha256(thumbprint.encode()).digest())
    return key, kid, {"kty": "RSA", "use": "sig", "alg": "RS512", "kid": kid, "n": n, "e": e}


def _sign(key: RSAPrivateKey, signing_input: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA512())


def jwks(sign: bool) -> dict[str, Any]:
    """The key set to serve: the signing key's public JWK, or none."""
    signer = signing_key() if sign else None
    return {"keys": [signer[2]] if signer is not None else []}


def make_jwt(header: dict[str, Any], claims: dict[str, Any], sign: bool) -> str:
    """A compact JWS of ``claims``: RS512 with the process's key (its ``kid`` set in
    ``header``), or a random signature when ``sign`` is False or cryptography missing."""
    signer = signing_key() if sign else None
    if signer is not None:
        header = {**header, "kid": signer[1]}
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    if signer is None:
        return signing_input + "." + _b64(secrets.token_bytes(64))
    return signing_input + "." + _b64(_sign(signer[0], signing_input.encode("ascii")))


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port), ready for a server."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
