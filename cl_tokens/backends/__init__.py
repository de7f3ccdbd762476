"""Shared token caches, chosen by URL: ``memory://``, ``file:///dir``, ``redis://host/0``.

See ``TokenBackend`` to write your own.
"""

from ._base import BackendURL, LockHandle, TokenBackend, backend_from_url, known_schemes
from ._memory import MemoryBackend

__all__ = [
    "BackendURL",
    "LockHandle",
    "MemoryBackend",
    "TokenBackend",
    "backend_from_url",
    "known_schemes",
]
