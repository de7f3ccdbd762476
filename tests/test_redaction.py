"""Passwords in URLs and secrets in the wrong setting never reach a message or a repr.

The attacker here is anyone who reads logs, tracebacks or a process's error output; what
they must not get is any password, whatever characters it holds (generated secrets have
``/``, ``#``, ``?`` and ``@``), or a secret pasted into the wrong variable.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cl_tokens import ConfigurationError, Settings
from cl_tokens.backends import backend_from_url
from cl_tokens.backends._base import BackendURL, redact_url
from cl_tokens.backends._redis import RedisBackend

# Any printable character: no controls (a URL cannot hold them raw), anything else goes.
passwords = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
)
# What a generated secret pasted into the wrong variable looks like: long, letters and more.
pasted = st.text(
    st.characters(min_codepoint=0x21, blacklist_categories=("Cc", "Cs", "Z")),
    min_size=17,
    max_size=60,
).filter(lambda s: any(c.isalpha() for c in s) and not all(c.isalpha() for c in s))


def _placeholder(secret: str) -> str:
    """A stand-in of the same length sharing no character with ``secret``."""
    char = next(c for c in "QZXJKVWYqzxjkvwy" if c not in secret)
    return char * len(secret)


def assert_hidden(show: Callable[[str], str], secret: str) -> None:
    """``show(secret)`` must not contain ``secret``. A secret that the text shown for a
    stand-in holds anyway (``*``, ``redis``) proves nothing, and is skipped."""
    assume(secret not in show(_placeholder(secret)))
    assert secret not in show(secret)


def _message(build: Callable[[], object]) -> str:
    try:
        return repr(build())
    except ConfigurationError as exc:
        return str(exc)


# -- redact_url ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "redis://user:{}@cache.example:6379/0",
        "rediss://:{}@cache.example/1?ssl_cert_reqs=none",
        "redis+cluster://user:{}@[::1]:7000",
        "memory://user:{}@",
        "file://user:{}@/var/cache/cl-tokens",
        "https://user:{}@auth.example/oauth/token#frag",
    ],
)
@settings(max_examples=150)
@given(password=passwords)
def test_redact_url_never_shows_a_password(template: str, password: str) -> None:
    shown = redact_url(template.format(password))
    assume(password not in redact_url(template.format(_placeholder(password))))
    assert password not in shown
    # The same output whatever the password holds: nothing in it moves the host.
    assert shown == redact_url(template.format(_placeholder(password)))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:pa/ss@cache:6379/0", "redis://u:***@cache:6379/0"),
        ("redis://u:pa#ss@cache:6379/0", "redis://u:***@cache:6379/0"),
        ("redis://u:pa?ss@cache:6379/0", "redis://u:***@cache:6379/0"),
        ("redis://u:p@ss@cache:6379/0", "redis://u:***@cache:6379/0"),
        ("redis://u:pw@cache/0?password=TOP&db=1", "redis://u:***@cache/0?password=***&db=***"),
        ("redis://:pw@[::1/0", "<unparseable URL>"),
        ("S3cret-pasted-in-the-wrong-place", "<unparseable URL>"),
        ("redis://u:pw@cache:99999999/0", "<unparseable URL>"),
        ("memory://", "memory://"),
        ("file:///var/cache/cl-tokens", "file:///var/cache/cl-tokens"),
    ],
)
def test_redact_url_examples(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- settings ----------------------------------------------------------------------------


@settings(max_examples=100)
@given(password=passwords)
def test_repr_settings_never_shows_a_password(password: str) -> None:
    def show(secret: str) -> str:
        return _message(
            lambda: Settings(
                client_id="my-client",
                client_secret=secret,
                backend=f"redis://user:{secret}@cache.example:6379/0",
            )
        )

    assert_hidden(show, password)


@settings(max_examples=60)
@given(password=passwords)
@pytest.mark.parametrize(
    ("variable", "template"),
    [
        ("AUTH_URL", "{}"),
        ("AUTH_URL", "https://user:{}@auth.example/oauth/token"),
        ("AUTH_URL", "ftp://user:{}@auth.example/"),
        ("TOKEN_BACKEND", "redis://user:{}@cache.example:6379/0"),
        ("TOKEN_BACKEND", "nosuch://user:{}@cache.example"),
        ("TOKEN_BACKEND", "memory://user:{}@"),
        ("TOKEN_BACKEND", "file://user:{}@relative/dir"),
    ],
)
def test_a_url_setting_never_echoes_its_password(
    variable: str, template: str, password: str
) -> None:
    def show(secret: str) -> str:
        environ = {"CL_CLIENT_ID": "my-client", f"CL_{variable}": template.format(secret)}
        return _message(lambda: Settings.from_env(environ))

    assert_hidden(show, password)


@settings(max_examples=60)
@given(secret=pasted)
@pytest.mark.parametrize(
    "variable",
    ["AUTH_URL", "TOKEN_BACKEND", "SAFETY_MARGIN", "ATTEMPTS", "STRICT", "BODY_ENCODING"],
)
def test_a_secret_pasted_into_the_wrong_variable_is_named_never_echoed(
    variable: str, secret: str
) -> None:
    environ = {"CL_CLIENT_ID": "my-client", f"CL_{variable}": secret}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(environ)
    assert f"CL_{variable}" in str(info.value)
    assert secret.strip() not in str(info.value)
    assert secret.strip()[:8] not in str(info.value)  # not even a prefix


# -- backends ----------------------------------------------------------------------------


@settings(max_examples=60)
@given(password=passwords)
@pytest.mark.parametrize(
    "template",
    [
        "redis://user:{}@cache.example:99999/0",
        "redis://user:{}@[::1/0",
        "memory://user:{}@",
        "nosuch://user:{}@cache.example",
    ],
)
def test_backend_from_url_errors_never_echo_the_password(template: str, password: str) -> None:
    def show(secret: str) -> str:
        return _message(lambda: backend_from_url(template.format(secret)))

    assert_hidden(show, password)


@settings(max_examples=100)
@given(password=passwords, encode=st.booleans())
def test_repr_redis_backend_never_shows_the_password_and_redis_gets_it_whole(
    password: str, encode: bool
) -> None:
    written = quote(password, safe="") if encode else password
    url = f"redis://user:{written}@cache.example:6379/0"
    backend = RedisBackend(url=url)
    # The client connects where the URL says, with the whole password.
    assert BackendURL.parse(url).password == password
    kwargs = backend.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("cache.example", 6379, password)
    assume(
        password not in "RedisBackend(url='redis://user:***@cache.example:6379/0', encrypted=False)"
    )
    assert password not in repr(backend)
    assert written not in repr(backend)
    assert_hidden(
        lambda secret: _message(
            lambda: Settings(client_id="id", backend=f"redis://user:{secret}@cache.example:6379/0")
        ),
        written,
    )


def test_memory_url_with_credentials_is_refused_without_echo() -> None:
    with pytest.raises(ConfigurationError, match="memory:// takes no credentials") as info:
        backend_from_url("memory://user:TOP-SECRET@localhost")
    assert "TOP-SECRET" not in str(info.value)
