"""Token revocation: one POST to ``{issuer}/oauth/revoke``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from ._endpoint import RETRYABLE_STATUSES, _error_fields, auth_url_problem
from ._errors import AuthenticationError, TokenEndpointError
from ._token import Token, fingerprint
from ._version import __version__

__all__ = ["revocation_url", "revoke_token"]

logger = logging.getLogger("cl_tokens")

_MAX_BODY = 64 * 1024
_REJECTED = frozenset({400, 401, 403})
_CL_DOMAIN = "commercelayer.io"


def revocation_url(token: Token, auth_url: str) -> str:
    """Where to revoke ``token``: ``{iss}/oauth/revoke``, else the auth_url's origin.

    The request carries the client secret, so the ``iss`` claim (unverified, and maybe
    read from a shared backend others can write to) is followed only when it is the
    token endpoint's own host or Commerce Layer's ``auth.`` host, over https (plain
    http to loopback only). Any other ``iss`` falls back to the auth_url's origin.

    Args:
        token: the token to revoke.
        auth_url: the manager's token endpoint.
    """
    auth = urlsplit(auth_url)
    fallback = f"{auth.scheme}://{auth.netloc}/oauth/revoke"
    claims = token.claims
    iss = claims.iss if claims is not None else None
    if not iss:
        return fallback
    parts = urlsplit(iss)
    host = (parts.hostname or "").lower()
    problem = auth_url_problem(iss)
    if problem is not None or parts.query or parts.fragment:
        logger.warning(
            "revoking at %s, not at the token's issuer %r: the issuer URL %s",
            fallback,
            iss,
            problem or "has a query or fragment",
        )
        return fallback
    commerce_layer = host.startswith("auth.") and (
        host[5:] == _CL_DOMAIN or host[5:].endswith("." + _CL_DOMAIN)
    )
    if host == (auth.hostname or "").lower() or commerce_layer:
        return iss.rstrip("/") + "/oauth/revoke"
    logger.debug("revoking at %s: the token's issuer %r is another host", fallback, iss)
    return fallback


async def revoke_token(
    session: aiohttp.ClientSession,
    token: Token,
    *,
    auth_url: str,
    client_id: str,
    client_secret: str | None,
    timeout: float,
) -> None:
    """Revoke ``token`` at its issuer's ``/oauth/revoke`` (see ``revocation_url``).

    Args:
        session: the session that sends the request.
        token: the token to revoke.
        auth_url: the manager's token endpoint (the fallback origin).
        client_id: the credentials' client id.
        client_secret: the client secret; None for sales-channel credentials.
        timeout: seconds the request may take in all.

    Raises:
        AuthenticationError: the endpoint answered 400, 401 or 403.
        TokenEndpointError: any other non-2xx answer, a timeout or a connection failure.
    """
    url = revocation_url(token, auth_url)
    body = {"client_id": client_id, "token": token.access_token}
    if client_secret is not None:
        body["client_secret"] = client_secret

    def redact(text: str) -> str:
        for secret in (client_secret, token.access_token):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    try:
        async with session.post(
            url,
            json=body,
            headers={"Accept": "application/json", "User-Agent": f"cl-tokens/{__version__}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
            # A redirect would carry the secret to wherever the server points.
            allow_redirects=False,
        ) as response:
            raw = await response.content.read(_MAX_BODY)
            status = response.status
    except asyncio.TimeoutError:
        raise TokenEndpointError(
            f"revocation endpoint {url} did not answer within {timeout:g} s", retryable=True
        ) from None
    except aiohttp.ClientError as exc:
        raise TokenEndpointError(
            f"revocation endpoint {url} unreachable: {type(exc).__name__}: {redact(str(exc))}",
            retryable=True,
        ) from None
    if 200 <= status < 300:
        logger.info("revoked token %s", fingerprint(token.access_token))
        return
    raise _error(status, raw, redact)


def _error(
    status: int, raw: bytes, redact: Callable[[str], str]
) -> AuthenticationError | TokenEndpointError:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    # The server's words may echo the request: strip the secret and the token from them.
    code, title, detail = (redact(f) if f else None for f in _error_fields(data))
    summary = " ".join(p for p in (code, title) if p)
    if status in _REJECTED:
        message = f"token revocation rejected (HTTP {status}{': ' + summary if summary else ''})"
        if detail:
            message += f": {detail}"
        return AuthenticationError(message, status=status, code=code, title=title, detail=detail)
    message = f"revocation endpoint answered HTTP {status}"
    said = "; ".join(p for p in (summary, detail) if p)
    if said:
        message += f": {said}"
    return TokenEndpointError(message, status=status, retryable=status in RETRYABLE_STATUSES)
