"""Token revocation: one POST to ``{issuer}/oauth/revoke``."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import aiohttp

from ._endpoint import auth_url_problem
from ._http import error_for, post, redactor, safe_text
from ._token import Token, fingerprint
from ._version import package_version

__all__ = ["revocation_url", "revoke_token"]

logger = logging.getLogger("cl_tokens")

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``url``, the default port filled in; None if unparseable."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def revocation_url(token: Token, auth_url: str) -> str:
    """Where to revoke ``token``: ``{iss}/oauth/revoke``, else the auth_url's origin.

    The request carries the client secret, so the ``iss`` claim (unverified, and maybe
    read from a shared backend others can write to) is followed only when it is the
    token endpoint's exact origin: same scheme, host and port. Any other ``iss`` (another
    port of the same host included) falls back to the auth_url's origin.

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
    problem = auth_url_problem(iss)
    if problem is None and (len(iss) > 512 or not iss.isprintable()):
        problem = "is over 512 characters or has control characters"
    if problem is not None or "?" in iss or "#" in iss:
        logger.warning(
            "revoking at %s, not at the token's issuer %s: the issuer URL %s",
            fallback,
            safe_text(repr(iss)),
            problem or "has a query or fragment",
        )
        return fallback
    if _origin(iss) == _origin(auth_url):
        return iss.rstrip("/") + "/oauth/revoke"
    logger.debug(
        "revoking at %s: the token's issuer %s is another origin",
        fallback,
        safe_text(repr(iss)),
    )
    return fallback


async def revoke_token(
    session: aiohttp.ClientSession,
    token: Token,
    *,
    auth_url: str,
    client_id: str,
    client_secret: str | None,
    timeout: float,
    form: bool = False,
    value: str | None = None,
) -> None:
    """Revoke ``token`` at its issuer's ``/oauth/revoke`` (see ``revocation_url``).

    ``value`` revokes another token of the same issuer instead (a customer's refresh
    token): ``token`` then only says where.

    Args:
        session: the session that sends the request.
        token: the token to revoke.
        auth_url: the manager's token endpoint (the fallback origin).
        client_id: the credentials' client id.
        client_secret: the client secret; None for sales-channel credentials.
        timeout: seconds the request may take in all.
        form: send the body form-encoded (RFC 7009 servers), not as JSON.

    Raises:
        AuthenticationError: the endpoint answered 400, 401 or 403.
        TokenEndpointError: any other non-2xx answer, a timeout or a connection failure.
    """
    url = revocation_url(token, auth_url)
    revoked = token.access_token if value is None else value
    body = {"client_id": client_id, "token": revoked}
    if client_secret is not None:
        body["client_secret"] = client_secret

    redact = redactor(client_secret, token.access_token, revoked)

    answer = await post(
        session,
        url,
        body=body,
        form=form,
        headers={"Accept": "application/json", "User-Agent": f"cl-tokens/{package_version()}"},
        timeout=timeout,
        what=f"revocation endpoint {url}",
        redact=redact,
    )
    if 200 <= answer.status < 300:
        logger.info("revoked token %s", fingerprint(revoked))
        return
    raise error_for(
        answer,
        what=f"revocation endpoint {url}",
        action="token revocation",
        redact=redact,
        now=time.time(),
    )
