"""Shared token caches, chosen by URL: ``memory://``, ``file:///dir``, ``redis://host/0``.

See ``TokenBackend`` to write your own.

``FileBackend`` and ``RedisBackend`` are imported on first use (PEP 562), so that
``import cl_tokens`` does not pay for file locking or the Redis client;
``backend_from_url`` imports them by scheme the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import BackendURL, LockHandle, TokenBackend, backend_from_url, known_schemes
from ._memory import MemoryBackend

if TYPE_CHECKING:
    from ._file import FileBackend
    from ._redis import RedisBackend

__all__ = [
    "BackendURL",
    "FileBackend",
    "LockHandle",
    "MemoryBackend",
    "RedisBackend",
    "TokenBackend",
    "backend_from_url",
    "known_schemes",
]

_LAZY = {"FileBackend": "._file", "RedisBackend": "._redis"}


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
