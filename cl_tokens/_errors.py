"""Every exception cl_tokens raises.

    TokenError                      base class: catch this to catch them all
    ├── AuthenticationError         the token endpoint rejected the credentials (400/401/403)
    │   └── LoginRequiredError      a customer has no usable token or refresh token: log in
    ├── TokenEndpointError          the endpoint failed: 5xx, 429, timeout, connection, bad body
    ├── BackendError                a shared cache backend failed (raised only in strict mode)
    └── ConfigurationError          bad arguments or settings (also a ValueError)

No message ever holds a client secret or an access token: at most a fingerprint
(the last four characters), see ``cl_tokens._token.fingerprint``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "BackendError",
    "ConfigurationError",
    "LoginRequiredError",
    "TokenEndpointError",
    "TokenError",
]


class TokenError(Exception):
    """Base class of every error raised by cl_tokens."""


class AuthenticationError(TokenError):
    """The token endpoint rejected the request (HTTP 400, 401 or 403); never retried.

    Attributes:
        status: the HTTP status.
        code: Commerce Layer's error code (``UNAUTHORIZED``) or the OAuth2 ``error``.
        title: Commerce Layer's error title (``invalid_client``), if any.
        detail: the human-readable detail, with any echo of the secret removed.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str | None = None,
        title: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail


class LoginRequiredError(AuthenticationError):
    """A customer's token cannot be had without a new login: nothing is cached for them,
    or their refresh token was refused (spent, revoked or expired).

    Attributes:
        owner_id: the customer (or user) who must log in again.
    """

    def __init__(self, message: str, *, owner_id: str, status: int = 0, **fields: Any) -> None:
        super().__init__(message, status=status, **fields)
        self.owner_id = owner_id


class TokenEndpointError(TokenError):
    """The token endpoint could not give a token: 5xx, 429, a timeout, a connection
    failure or a malformed response, once the retries are spent.

    Attributes:
        status: the HTTP status of the last response, or None when there was none.
        retry_after: seconds the server asked us to wait (``Retry-After``), if it did.
        retryable: whether the failure is transient (used by the retry loop).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.retryable = retryable


class BackendError(TokenError):
    """A shared cache backend (file, Redis, ...) failed.

    The manager raises it only with ``strict=True``; otherwise it logs one warning and
    carries on with its in-process tier. The backend's own exception is ``__cause__``.
    """


class ConfigurationError(TokenError, ValueError):
    """Bad arguments or settings: the message names every problem found."""
