"""pytest fixtures for code that uses cl_tokens, registered by the ``pytest11`` entry point.

Installing cl-tokens makes them available in every test suite, with nothing to import:

- ``cl_fake_auth``: a started ``FakeAuthServer`` (on a thread of its own, so sync and
  async tests alike can call it); point your code at ``cl_fake_auth.url``.
- ``cl_token_manager``: a ``TokenManager`` bound to ``cl_fake_auth``'s credentials and
  endpoint, closed at teardown. An async fixture: it needs pytest-asyncio (either mode).

Override ``cl_fake_auth_options`` or ``cl_token_manager_options`` (in a conftest or a
test module) to pass keyword arguments to ``FakeAuthServer`` or ``TokenManager``::

    @pytest.fixture
    def cl_fake_auth_options():
        return {"organization_slug": "acme", "latency": 0.05}

Disable the plugin with ``-p no:cl_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    # Imported by the fixtures, not here: pytest loads this plugin in every session of
    # every project where cl-tokens is installed, most of which never use it.
    from .._manager import TokenManager
    from ._fake_server import FakeAuthServer

# cl_token_manager is defined below under a private name: its definition depends on
# whether pytest-asyncio is installed.
__all__ = ["cl_fake_auth", "cl_fake_auth_options", "cl_token_manager_options"]


@pytest.fixture
def cl_fake_auth_options() -> dict[str, Any]:
    """Keyword arguments for the ``cl_fake_auth`` server; override to change them."""
    return {}


@pytest.fixture
def cl_token_manager_options() -> dict[str, Any]:
    """Extra keyword arguments for ``cl_token_manager`` (``scope``, ``backend``...)."""
    return {}


@pytest.fixture
def cl_fake_auth(cl_fake_auth_options: dict[str, Any]) -> Iterator[FakeAuthServer]:
    """A started fake Commerce Layer token server, stopped after the test."""
    from ._fake_server import FakeAuthServer

    with FakeAuthServer(**cl_fake_auth_options).in_thread() as server:
        yield server


def _manager(server: FakeAuthServer, options: dict[str, Any]) -> TokenManager:
    from .._manager import TokenManager

    options = {"auth_url": server.url, **options}
    return TokenManager(server.client_id, server.client_secret, **options)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only without pytest-asyncio
    pytest_asyncio = None  # type: ignore[assignment]

if pytest_asyncio is not None:

    @pytest_asyncio.fixture(name="cl_token_manager")
    async def _cl_token_manager(
        cl_fake_auth: FakeAuthServer, cl_token_manager_options: dict[str, Any]
    ) -> AsyncIterator[TokenManager]:
        """A TokenManager bound to ``cl_fake_auth``, closed after the test."""
        manager = _manager(cl_fake_auth, cl_token_manager_options)
        try:
            yield manager
        finally:
            await manager.aclose()

else:  # pragma: no cover

    @pytest.fixture(name="cl_token_manager")
    def _cl_token_manager_needs_pytest_asyncio() -> None:
        """A TokenManager bound to ``cl_fake_auth`` (needs pytest-asyncio)."""
        pytest.fail(
            "the cl_token_manager fixture is async: pip install pytest-asyncio "
            "(or build a TokenManager from cl_fake_auth.url in your own async fixture)",
            pytrace=False,
        )
