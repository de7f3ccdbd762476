"""cl_tokens: get, cache and share OAuth2 access tokens for the Commerce Layer APIs.

async with TokenManager(client_id, client_secret, scope="market:code:europe") as manager:
    headers = await manager.header()
"""

from ._aiohttp_middleware import TokenMiddleware
from ._clock import Clock, SystemClock
from ._errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    LoginRequiredError,
    TokenEndpointError,
    TokenError,
)
from ._grants import create_assertion
from ._jwks import JWKSVerifier
from ._manager import DEFAULT_AUTH_URL, TokenManager
from ._settings import Settings
from ._token import Token, TokenClaims
from ._tuning import Tuning
from ._version import __version__

# Plain sorted() order, as tests/test_exports.py asserts; ruff's RUF022 would put the
# SCREAMING_CASE name first instead.
__all__ = [  # noqa: RUF022
    "AuthenticationError",
    "BackendError",
    "Clock",
    "ConfigurationError",
    "DEFAULT_AUTH_URL",
    "JWKSVerifier",
    "LoginRequiredError",
    "Settings",
    "SystemClock",
    "Token",
    "TokenClaims",
    "TokenEndpointError",
    "TokenError",
    "TokenManager",
    "TokenMiddleware",
    "Tuning",
    "__version__",
    "create_assertion",
]
