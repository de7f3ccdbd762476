"""Shared token caches, chosen by URL: ``memory://``, ``file:///dir``, ``redis://host/0``.

See ``TokenBackend`` to write your own.
"""

from ._base import BackendURL, LockHandle, TokenBackend, backend_from_url, known_schemes
from ._file import FileBackend
from ._memory import MemoryBackend
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
