"""Test helpers for suites that use cl_tokens: a real local Commerce Layer token server."""

from ._fake_server import FakeAuthServer, RecordedRequest

__all__ = ["FakeAuthServer", "RecordedRequest"]
