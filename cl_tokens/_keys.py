"""Cache keys: one per (auth_url, client_id, scope), never derived from the secret."""

from __future__ import annotations

import hashlib

__all__ = ["cache_key"]

KEY_PREFIX = "cl_tokens:v1:"


def cache_key(auth_url: str, client_id: str, scope: str | None) -> str:
    """``cl_tokens:v1:`` + a SHA-256 of the three parts (the client id stays unreadable)."""
    material = "\x1f".join((auth_url, client_id, scope or ""))
    return KEY_PREFIX + hashlib.sha256(material.encode()).hexdigest()[:40]
