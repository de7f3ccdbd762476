"""The installed distribution's version, read on first use.

``importlib.metadata`` (with zipfile, csv and importlib.resources) costs about a fifth
of aiohttp's own import time, so it is imported when the version is first asked for,
not by ``import cl_tokens``.
"""

from __future__ import annotations

import functools

__all__ = ["package_version"]  # and ``__version__``, through __getattr__


@functools.cache
def package_version() -> str:
    """``cl-tokens``'s version from its installed metadata; "0.0.0" from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cl-tokens")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def __getattr__(name: str) -> str:
    # PEP 562: ``from ._version import __version__`` still works, computed on demand.
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
