"""cl_tokens: get, cache and share OAuth2 access tokens for the Commerce Layer APIs.

async with TokenManager(client_id, client_secret, scope="market:code:europe") as manager:
    headers = await manager.header()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clock import Clock, SystemClock
from ._errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    LoginRequiredError,
    TokenEndpointError,
    TokenError,
)
from ._manager import DEFAULT_AUTH_URL, TokenManager
from ._token import Token, TokenClaims
from ._tuning import Tuning

if TYPE_CHECKING:
    from ._aiohttp_middleware import TokenMiddleware
    from ._grants import create_assertion
    from ._jwks import JWKSVerifier
    from ._settings import Settings
    from ._sync import SyncTokenManager
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
    "SyncTokenManager",
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

# Imported on first use (PEP 562), so that ``import cl_tokens`` costs little more than
# ``import aiohttp`` (benchmarks: "import"); tests/test_lazy_imports.py keeps these
# modules out of a bare import. What header() needs is imported above.
_LAZY = {
    "JWKSVerifier": "._jwks",
    "Settings": "._settings",
    "SyncTokenManager": "._sync",
    "TokenMiddleware": "._aiohttp_middleware",
    "__version__": "._version",
    "create_assertion": "._grants",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
