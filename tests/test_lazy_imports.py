"""``import cl_tokens`` stays lean: what header() does not need is imported on first use.

Each check runs in a fresh interpreter, since this test process has long imported all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules a bare ``import cl_tokens`` must not import (beyond what aiohttp imports).
DEFERRED = (
    "cl_tokens._aiohttp_middleware",
    "cl_tokens._cli",
    "cl_tokens._demo",
    "cl_tokens._httpx_auth",
    "cl_tokens._jwks",
    "cl_tokens._requests_auth",
    "cl_tokens._settings",
    "cl_tokens._sync",
    "cl_tokens.backends._file",
    "cl_tokens.backends._redis",
    "cl_tokens.backends._redis_urls",
    "cl_tokens.testing",
    "difflib",
    "importlib.metadata",
    "redis",
    "zipfile",
)


def _fresh(code: str) -> object:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_cl_tokens_leaves_deferred_modules_out() -> None:
    added = _fresh(
        "import json, sys\n"
        "import aiohttp\n"
        "before = set(sys.modules)\n"
        "import cl_tokens\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    assert isinstance(added, list)
    assert "cl_tokens._manager" in added  # the probe sees what the import brings
    assert [m for m in added if m in DEFERRED or m.split(".")[0] == "redis"] == []


@pytest.mark.parametrize(
    ("statement", "module"),
    [
        ("from cl_tokens import Settings", "cl_tokens._settings"),
        ("from cl_tokens import SyncTokenManager", "cl_tokens._sync"),
        ("from cl_tokens import JWKSVerifier", "cl_tokens._jwks"),
        ("from cl_tokens import TokenMiddleware", "cl_tokens._aiohttp_middleware"),
        ("from cl_tokens import __version__", "importlib.metadata"),
        ("from cl_tokens.backends import FileBackend", "cl_tokens.backends._file"),
        ("from cl_tokens.backends import RedisBackend", "cl_tokens.backends._redis"),
    ],
)
def test_a_deferred_name_imports_its_module_on_first_use(statement: str, module: str) -> None:
    loaded = _fresh(f"import json, sys\n{statement}\nprint(json.dumps({module!r} in sys.modules))")
    assert loaded is True


def test_backend_urls_find_the_deferred_backends_by_scheme() -> None:
    found = _fresh(
        "import json, sys, tempfile\n"
        "from cl_tokens.backends import backend_from_url, known_schemes\n"
        "schemes = known_schemes()\n"
        "file_loaded_early = 'cl_tokens.backends._file' in sys.modules\n"
        "backend = backend_from_url('file://' + tempfile.mkdtemp())\n"
        "redis = backend_from_url('redis://127.0.0.1:1/0')\n"
        "print(json.dumps([schemes, file_loaded_early, type(backend).__name__,"
        " type(redis).__name__]))\n"
    )
    assert isinstance(found, list)
    schemes, file_loaded_early, file_cls, redis_cls = found
    assert {"file", "memory", "redis", "rediss", "redis+cluster", "redis+sentinel"} <= set(schemes)
    assert file_loaded_early is False
    assert (file_cls, redis_cls) == ("FileBackend", "RedisBackend")


def test_the_bundled_scheme_table_matches_the_backends() -> None:
    from cl_tokens.backends import FileBackend, RedisBackend, _base

    declared = {s: "._file" for s in FileBackend.schemes}
    declared |= {s: "._redis" for s in RedisBackend.schemes}
    assert declared == _base._BUNDLED


def test_star_import_and_dir_list_every_public_name() -> None:
    names = _fresh(
        "import json\n"
        "import cl_tokens\n"
        "namespace = {}\n"
        "exec('from cl_tokens import *', namespace)\n"
        "print(json.dumps([sorted(set(cl_tokens.__all__) - set(namespace)),"
        " sorted(set(cl_tokens.__all__) - set(dir(cl_tokens)))]))\n"
    )
    assert names == [[], []]


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    import cl_tokens
    import cl_tokens.backends

    with pytest.raises(AttributeError, match="no_such_name"):
        _ = cl_tokens.no_such_name
    with pytest.raises(AttributeError, match="NoSuchBackend"):
        _ = cl_tokens.backends.NoSuchBackend
