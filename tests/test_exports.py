"""The public surface: sorted __all__, every name importable, py.typed shipped."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import cl_tokens


@pytest.mark.parametrize("module", ["cl_tokens", "cl_tokens.backends", "cl_tokens.testing"])
def test_all_is_sorted_and_importable(module: str) -> None:
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_py_typed_is_shipped() -> None:
    assert (Path(cl_tokens.__file__).parent / "py.typed").exists()


def test_error_tree() -> None:
    assert issubclass(cl_tokens.AuthenticationError, cl_tokens.TokenError)
    assert issubclass(cl_tokens.TokenEndpointError, cl_tokens.TokenError)
    assert issubclass(cl_tokens.BackendError, cl_tokens.TokenError)
    assert issubclass(cl_tokens.ConfigurationError, cl_tokens.TokenError)
    assert issubclass(cl_tokens.ConfigurationError, ValueError)
