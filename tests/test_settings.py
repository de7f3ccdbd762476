"""Settings from the environment and from mappings: parsing, validation, messages, repr."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any

import pytest
from cryptography.fernet import Fernet

from cl_tokens import (
    DEFAULT_AUTH_URL,
    ConfigurationError,
    Settings,
    TokenManager,
    Tuning,
)
from cl_tokens.backends import FileBackend, MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "s3cr3t-client-VALUE-9f8e7d"
KEY = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="  # looks like a Fernet key

# A valid text value for each tuning option, and what it parses to.
TUNING_TEXT: dict[str, tuple[str, Any]] = {
    "safety_margin": ("12.5", 12.5),
    "refresh_window": ("300", 300.0),
    "refresh_jitter": ("0", 0.0),
    "min_refresh_gap": ("7", 7.0),
    "attempts": ("5", 5),
    "backoff_base": ("0.5", 0.5),
    "backoff_cap": ("4", 4.0),
    "throttle_cap": ("90", 90.0),
    "fetch_deadline": ("20", 20.0),
    "attempt_timeout": ("3", 3.0),
    "auth_failure_cooldown": ("2", 2.0),
    "lock_lease": ("45", 45.0),
    "lock_wait": ("9", 9.0),
    "lock_poll_interval": ("0.02", 0.02),
    "backend_timeout": ("0.75", 0.75),
    "backend_retry_interval": ("1.5", 1.5),
    "clock_check_interval": ("0.25", 0.25),
    "hot_tier": ("off", False),
    "strict": ("yes", True),
    "max_customers": ("500", 500),
    "allow_plaintext_refresh_tokens": ("on", True),
}


def env(**values: str) -> dict[str, str]:
    """An environment with a client id, plus ``values`` keyed by variable suffix."""
    base = {"CL_CLIENT_ID": "my-client"}
    base.update({f"CL_{name}": value for name, value in values.items()})
    return base


def problems_of(error: pytest.ExceptionInfo[ConfigurationError]) -> str:
    return str(error.value)


# -- the shape of Settings ------------------------------------------------------------------


def test_settings_has_every_tuning_option_with_tunings_defaults() -> None:
    settings = Settings(client_id="x")
    for f in dataclasses.fields(Tuning):
        assert getattr(settings, f.name) == f.default, f.name
    assert settings.tuning == Tuning()
    assert set(TUNING_TEXT) == set(Tuning.names())


def test_defaults_of_the_other_fields() -> None:
    settings = Settings(client_id="x")
    assert settings.client_secret is None
    assert settings.scope is None
    assert settings.auth_url == DEFAULT_AUTH_URL
    assert settings.backend == "memory://"
    assert settings.encryption_key is None
    assert settings.body_encoding == "json"


def test_keyword_construction_and_frozen() -> None:
    settings = Settings(client_id="x", safety_margin=5, attempts=2, strict=True)
    assert (settings.safety_margin, settings.attempts, settings.strict) == (5, 2, True)
    assert settings.tuning.safety_margin == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.client_id = "y"  # type: ignore[misc]


def test_direct_construction_validates_by_field_name() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings(client_id="", client_secret=SECRET, attempts=0, auth_url="ftp://x")
    message = problems_of(error)
    assert "client_id is required" in message
    assert "attempts must be a whole number of at least 1" in message
    assert "auth_url must be an https URL" in message
    assert SECRET not in message


def test_manager_kwargs_are_exactly_token_manager_parameters() -> None:
    kwargs = Settings(client_id="x").manager_kwargs()
    parameters = set(inspect.signature(TokenManager.__init__).parameters)
    # encryption_key reaches the manager as backend_options (one way, not two).
    assert set(kwargs) == parameters - {"self", "session", "clock", "encryption_key"}
    assert kwargs["backend_options"] is None


def test_encryption_key_becomes_a_backend_option(tmp_path: Any) -> None:
    settings = Settings(client_id="x", backend=f"file://{tmp_path}", encryption_key=KEY)
    assert settings.manager_kwargs()["backend_options"] == {"encryption_key": KEY}
    new, old = Fernet.generate_key().decode(), KEY
    rotated = Settings(client_id="x", backend=f"file://{tmp_path}", encryption_key=f"{new}, {old}")
    assert rotated.manager_kwargs()["backend_options"] == {"encryption_key": [new, old]}


# -- from_env ------------------------------------------------------------------------------


def test_from_env_reads_every_variable(tmp_path: Any) -> None:
    environ = {
        "CL_CLIENT_ID": "my-client",
        "CL_CLIENT_SECRET": SECRET,
        "CL_SCOPE": "market:code:europe",
        "CL_AUTH_URL": "https://auth.example.com/oauth/token",
        "CL_TOKEN_BACKEND": f"file://{tmp_path}",
        "CL_TOKEN_ENCRYPTION_KEY": KEY,
        "CL_BODY_ENCODING": "FORM",
        **{f"CL_{name.upper()}": text for name, (text, _) in TUNING_TEXT.items()},
    }
    settings = Settings.from_env(environ)
    assert settings.client_id == "my-client"
    assert settings.client_secret == SECRET
    assert settings.scope == "market:code:europe"
    assert settings.auth_url == "https://auth.example.com/oauth/token"
    assert settings.backend == f"file://{tmp_path}"
    assert settings.encryption_key == KEY
    assert settings.body_encoding == "form"
    for name, (_, value) in TUNING_TEXT.items():
        assert getattr(settings, name) == value, name
        assert type(getattr(settings, name)) is type(value), name


@pytest.mark.parametrize("name", sorted(TUNING_TEXT))
def test_each_tuning_variable_alone(name: str) -> None:
    text, value = TUNING_TEXT[name]
    settings = Settings.from_env(env(**{name.upper(): text}))
    assert getattr(settings, name) == value
    others = [n for n in TUNING_TEXT if n != name]
    assert all(getattr(settings, n) == getattr(Tuning(), n) for n in others)


def test_only_client_id_is_required_and_secret_is_optional() -> None:
    settings = Settings.from_env({"CL_CLIENT_ID": "sales-channel-id"})
    assert settings.client_id == "sales-channel-id"
    assert settings.client_secret is None


def test_empty_variables_count_as_unset() -> None:
    environ = env(
        CLIENT_SECRET="",
        SCOPE="",
        AUTH_URL="",
        TOKEN_BACKEND="",
        TOKEN_ENCRYPTION_KEY="",
        BODY_ENCODING="",
        SAFETY_MARGIN="",
        STRICT="",
        LOCK_WAIT="",
    )
    assert Settings.from_env(environ) == Settings(client_id="my-client")


def test_empty_client_id_is_missing() -> None:
    with pytest.raises(ConfigurationError, match="CL_CLIENT_ID is required"):
        Settings.from_env({"CL_CLIENT_ID": ""})


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CL_CLIENT_ID", "from-os-environ")
    monkeypatch.setenv("CL_ATTEMPTS", "7")
    settings = Settings.from_env()
    assert (settings.client_id, settings.attempts) == ("from-os-environ", 7)


def test_custom_prefix() -> None:
    environ = {"MYAPP_CLIENT_ID": "a", "MYAPP_ATTEMPTS": "2", "CL_CLIENT_ID": "ignored"}
    settings = Settings.from_env(environ, prefix="MYAPP_")
    assert (settings.client_id, settings.attempts) == ("a", 2)
    with pytest.raises(ConfigurationError, match="MYAPP_CLIENT_ID is required"):
        Settings.from_env({"CL_CLIENT_ID": "a"}, prefix="MYAPP_")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("0", False),
        ("true", True),
        ("FALSE", False),
        ("True", True),
        ("yes", True),
        ("No", False),
        ("on", True),
        ("OFF", False),
        (" yes ", True),
    ],
)
def test_booleans_from_text(text: str, value: bool) -> None:
    assert Settings.from_env(env(STRICT=text)).strict is value
    assert Settings.from_mapping({"client_id": "x", "strict": text}).strict is value


@pytest.mark.parametrize("text", ["maybe", "2", "y", "enabled", "-1"])
def test_invalid_boolean(text: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(STRICT=text))
    assert f"CL_STRICT must be true or false (1/0, yes/no, on/off), not {text!r}" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("variable", "text", "expected"),
    [
        (
            "SAFETY_MARGIN",
            "abc",
            "CL_SAFETY_MARGIN must be a number of seconds such as 30, not 'abc'",
        ),
        ("SAFETY_MARGIN", "-1", "CL_SAFETY_MARGIN must not be negative"),
        ("REFRESH_WINDOW", "0", "CL_REFRESH_WINDOW must be greater than 0"),
        (
            "FETCH_DEADLINE",
            "nan",
            "CL_FETCH_DEADLINE must be a finite number of seconds, not 'nan'",
        ),
        ("LOCK_WAIT", "inf", "CL_LOCK_WAIT must be a finite number of seconds, not 'inf'"),
        ("ATTEMPTS", "2.5", "CL_ATTEMPTS must be a whole number such as 3, not '2.5'"),
        ("ATTEMPTS", "0", "CL_ATTEMPTS must be a whole number of at least 1"),
        ("ATTEMPTS", "three", "CL_ATTEMPTS must be a whole number such as 3, not 'three'"),
        ("BACKOFF_CAP", "0.5", "CL_BACKOFF_CAP must be at least backoff_base"),
        ("BODY_ENCODING", "xml", "CL_BODY_ENCODING must be json or form, not 'xml'"),
        ("AUTH_URL", "http://auth.example.com/oauth/token", "CL_AUTH_URL must use https"),
        ("AUTH_URL", "not a url", "CL_AUTH_URL must be an https URL"),
        ("TOKEN_BACKEND", "memcached://localhost", "CL_TOKEN_BACKEND has an unknown scheme"),
        ("TOKEN_BACKEND", "/var/cache/cl-tokens", "CL_TOKEN_BACKEND must be a URL such as"),
        ("SCOPE", " market:code:europe", "CL_SCOPE has leading or trailing whitespace"),
    ],
)
def test_each_invalid_value_has_a_clear_message(variable: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(**{variable: text}))
    assert expected in str(error.value)
    assert str(error.value).startswith("invalid settings: ")


def test_unknown_backend_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(TOKEN_BACKEND="memcached://localhost"))
    for scheme in ("memory://", "file://", "redis://"):
        assert scheme in str(error.value)


def test_every_problem_in_one_error_in_field_order() -> None:
    environ = {
        "CL_CLIENT_SECRET": SECRET,
        "CL_AUTH_URL": "http://auth.example.com/oauth/token",
        "CL_TOKEN_BACKEND": "nope://x",
        "CL_SAFETY_MARGIN": "x",
        "CL_ATTEMPTS": "0",
        "CL_STRICT": "maybe",
    }
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(environ)
    message = str(error.value)
    names = re.findall(r"CL_[A-Z_]+", message)
    assert names == [
        "CL_CLIENT_ID",
        "CL_AUTH_URL",
        "CL_TOKEN_BACKEND",
        "CL_SAFETY_MARGIN",
        "CL_ATTEMPTS",
        "CL_STRICT",
    ]
    assert SECRET not in message


def test_the_secret_and_key_are_never_echoed() -> None:
    # Invalid in ways that would tempt a message to show them.
    environ = env(
        CLIENT_SECRET=f" {SECRET}\n",
        TOKEN_ENCRYPTION_KEY=f" {KEY} ",
        TOKEN_BACKEND="redis://:redis-password-123@localhost:6379/0",
        ATTEMPTS="zero",
    )
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(environ)
    message = str(error.value)
    assert "CL_CLIENT_SECRET has leading or trailing whitespace" in message
    assert "CL_TOKEN_ENCRYPTION_KEY has leading or trailing whitespace" in message
    for secret in (SECRET, KEY, "redis-password-123"):
        assert secret not in message


def test_encryption_key_with_memory_backend_is_a_problem() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(TOKEN_ENCRYPTION_KEY=KEY))
    assert "CL_TOKEN_ENCRYPTION_KEY is only used by backends" in str(error.value)
    assert KEY not in str(error.value)


@pytest.mark.parametrize("key", ["not-a-fernet-key-S3CRET", f"{KEY},c2VjcmV0LWtleQ=="])
def test_bad_encryption_key_is_named_by_its_own_variable(tmp_path: Any, key: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(TOKEN_BACKEND=f"file://{tmp_path}", TOKEN_ENCRYPTION_KEY=key))
    message = str(error.value)
    assert "CL_TOKEN_ENCRYPTION_KEY is not a Fernet key" in message
    assert "CL_TOKEN_BACKEND" not in message
    for part in key.split(","):
        assert part not in message
    with pytest.raises(ConfigurationError) as error:
        Settings.from_mapping(
            {"client_id": "x", "backend": f"file://{tmp_path}", "encryption_key": key}
        )
    assert "encryption_key is not a Fernet key" in str(error.value)
    assert "backend" not in str(error.value)


def test_second_bad_key_of_a_rotation_is_pointed_at(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"\(key #2 of 2\)"):
        Settings(client_id="x", backend=f"file://{tmp_path}", encryption_key=f"{KEY},nope")


def test_encryption_key_of_only_commas_is_a_problem(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="encryption_key has no key"):
        Settings(client_id="x", backend=f"file://{tmp_path}", encryption_key=",")


def test_encryption_key_without_cryptography_names_the_extra_under_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(TOKEN_BACKEND=f"file://{tmp_path}", TOKEN_ENCRYPTION_KEY=KEY))
    message = str(error.value)
    assert "CL_TOKEN_ENCRYPTION_KEY needs the encryption extra" in message
    assert "pip install 'cl-tokens[encryption]'" in message
    assert KEY not in message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file://var/cache/cl-tokens", "takes an absolute path after three slashes"),
        ("file://", "needs an absolute directory"),
        ("file:///", "needs an absolute directory"),
        ("file:///x?encryption_key=c2VjcmV0LWtleQ==", "takes no query options"),
    ],
)
def test_file_backend_url_needs_an_absolute_directory(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(TOKEN_BACKEND=url))
    message = str(error.value)
    assert message.startswith("invalid settings: CL_TOKEN_BACKEND ")
    assert why in message
    assert "c2VjcmV0LWtleQ" not in message
    assert Settings(client_id="x", backend="file:///var/cache/cl-tokens").backend


def test_backend_that_is_not_a_url_is_named_never_echoed() -> None:
    pasted = "S3CRET-pasted-into-the-wrong-variable-0123456789"
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(TOKEN_BACKEND=pasted))
    message = str(error.value)
    assert "CL_TOKEN_BACKEND must be a URL such as" in message
    assert pasted not in message
    assert "S3CRET" not in message  # not even a prefix: that much of a secret helps too
    assert "48-character value (not shown" in message


def test_long_bad_values_are_named_by_length_never_echoed() -> None:
    pasted = "x" * 200
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env(SAFETY_MARGIN=pasted))
    assert "xxxxxxxx" not in str(error.value)
    assert "CL_SAFETY_MARGIN must be a number of seconds such as 30, not a 200-character" in str(
        error.value
    )


# -- repr ------------------------------------------------------------------------------------


def test_repr_hides_secret_key_and_backend_password() -> None:
    settings = Settings(
        client_id="my-client",
        client_secret=SECRET,
        backend="redis://:redis-password-123@localhost:6379/0",
        encryption_key=KEY,
        attempts=5,
    )
    text = repr(settings)
    for secret in (SECRET, KEY, "redis-password-123"):
        assert secret not in text
        assert secret not in str(settings)
    assert "client_secret=<set>" in text
    assert "encryption_key=<set>" in text
    assert "redis://:***@localhost:6379/0" in text
    assert "attempts=5" in text
    assert "safety_margin" not in text  # defaults are left out
    assert "client_secret=None" in repr(Settings(client_id="x"))


# -- from_mapping ------------------------------------------------------------------------------


def test_from_mapping_typed_values(tmp_path: Any) -> None:
    settings = Settings.from_mapping(
        {
            "client_id": "my-client",
            "client_secret": SECRET,
            "scope": "market:id:xYZk",
            "auth_url": "https://auth.example.com/oauth/token",
            "backend": f"file://{tmp_path}",
            "encryption_key": KEY,
            "body_encoding": "form",
            **{name: value for name, (_, value) in TUNING_TEXT.items()},
        }
    )
    assert settings.client_secret == SECRET
    assert settings.scope == "market:id:xYZk"
    assert settings.backend == f"file://{tmp_path}"
    assert settings.body_encoding == "form"
    for name, (_, value) in TUNING_TEXT.items():
        assert getattr(settings, name) == value


def test_from_mapping_text_values_are_parsed() -> None:
    mapping = {"client_id": "x", **{name: text for name, (text, _) in TUNING_TEXT.items()}}
    settings = Settings.from_mapping(mapping)
    for name, (_, value) in TUNING_TEXT.items():
        assert getattr(settings, name) == value
        assert type(getattr(settings, name)) is type(value)


def test_from_mapping_none_and_empty_mean_default() -> None:
    settings = Settings.from_mapping(
        {"client_id": "x", "client_secret": None, "scope": "", "safety_margin": None}
    )
    assert settings == Settings(client_id="x")


def test_from_mapping_unknown_keys_are_named() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_mapping({"client_id": "x", "safty_margin": 5, "colour": "blue"})
    message = str(error.value)
    assert "'safty_margin' (did you mean 'safety_margin'?)" in message
    assert "'colour'" in message
    assert "known: allow_plaintext_refresh_tokens, attempt_timeout, attempts," in message


def test_from_mapping_problems_are_named_by_key() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_mapping(
            {
                "client_secret": SECRET,
                "safety_margin": "soon",
                "attempts": 2.5,
                "strict": 1,
                "scope": 42,
                "backend": "memory://",
                "encryption_key": KEY,
            }
        )
    message = str(error.value)
    assert "client_id is required" in message
    assert "safety_margin must be a number of seconds such as 30, not 'soon'" in message
    assert "attempts must be a whole number of at least 1" in message
    assert "strict must be true or false" in message
    assert "scope must be a non-empty string" in message
    assert "encryption_key is only used by backends" in message
    assert "CL_" not in message
    assert SECRET not in message
    assert KEY not in message


def test_from_mapping_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        Settings.from_mapping([("client_id", "x")])  # type: ignore[arg-type]


# -- into a manager ------------------------------------------------------------------------------


async def test_token_manager_from_env_and_from_settings(server: FakeAuthServer) -> None:
    environ = {
        "CL_CLIENT_ID": server.client_id,
        "CL_CLIENT_SECRET": server.client_secret or "",
        "CL_AUTH_URL": server.url,
        "CL_SCOPE": "market:code:europe",
        "CL_ATTEMPTS": "1",
    }
    async with TokenManager.from_env(environ) as manager:
        assert manager.scope == "market:code:europe"
        assert manager.tuning.attempts == 1
        assert isinstance(manager.backend, MemoryBackend)
        token = await manager.token()
    assert token.scope == "market:code:europe"
    settings = Settings.from_env(environ)
    async with TokenManager.from_settings(settings) as manager:
        await manager.header()
    mapping = {"client_id": server.client_id, "client_secret": server.client_secret}
    async with TokenManager.from_settings({**mapping, "auth_url": server.url}) as manager:
        await manager.header()
    assert server.token_requests == 3


async def test_file_backend_with_encryption_key_from_env(
    server: FakeAuthServer, tmp_path: Any
) -> None:
    key = Fernet.generate_key().decode()
    environ = {
        "CL_CLIENT_ID": server.client_id,
        "CL_CLIENT_SECRET": server.client_secret or "",
        "CL_AUTH_URL": server.url,
        "CL_TOKEN_BACKEND": f"file://{tmp_path}",
        "CL_TOKEN_ENCRYPTION_KEY": key,
    }
    async with TokenManager.from_env(environ) as manager:
        assert isinstance(manager.backend, FileBackend)
        token = await manager.token()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("*.json"))
    assert stored
    assert token.access_token.encode() not in stored
