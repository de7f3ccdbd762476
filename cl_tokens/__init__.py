"""cl_tokens: get, cache and share OAuth2 access tokens for the Commerce Layer APIs.

async with TokenManager(client_id, client_secret, scope="market:code:europe") as manager:
    headers = await manager.header()
"""

from ._clock import Clock, SystemClock
from ._errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    TokenEndpointError,
    TokenError,
)
from ._manager import DEFAULT_AUTH_URL, TokenManager
from ._token import Token, TokenClaims
from ._tuning import Tuning
from ._version import __version__

__all__ = [
    "DEFAULT_AUTH_URL",
    "AuthenticationError",
    "BackendError",
    "Clock",
    "ConfigurationError",
    "SystemClock",
    "Token",
    "TokenClaims",
    "TokenEndpointError",
    "TokenError",
    "TokenManager",
    "Tuning",
    "__version__",
]
