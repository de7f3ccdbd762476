"""Settings: a TokenManager's configuration from environment variables or a mapping.

Every source goes through one parser and one validator, so a bad configuration fails
once, with every problem listed under the name the user wrote it as (``CL_CLIENT_ID``
for the environment, ``client_id`` for a mapping, ``--client-id`` for a CLI flag).
No message ever echoes the client secret or the encryption key.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._endpoint import BodyEncoding, auth_url_problem
from ._errors import ConfigurationError
from ._http import safe_text
from ._manager import DEFAULT_AUTH_URL
from ._tuning import Tuning, tuning_problems
from .backends import known_schemes
from .backends._base import redact_url, split_userinfo
from .backends._file import file_url_problem

__all__ = ["ENV_NAMES", "Settings"]

DEFAULT_BACKEND = "memory://"

TUNING_NAMES: tuple[str, ...] = Tuning.names()
_TUNING_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Tuning)}
#: The tuning options read as booleans (``strict``, ``hot_tier``).
_BOOLEAN_NAMES = frozenset(
    name for name, value in _TUNING_DEFAULTS.items() if isinstance(value, bool)
)
_SECRETS = frozenset({"client_secret", "encryption_key"})
_TEXT_FIELDS = ("client_id", "client_secret", "scope", "auth_url", "backend", "encryption_key")

#: Settings field -> environment variable name without the prefix.
ENV_NAMES: dict[str, str] = {
    "client_id": "CLIENT_ID",
    "client_secret": "CLIENT_SECRET",
    "scope": "SCOPE",
    "auth_url": "AUTH_URL",
    "backend": "TOKEN_BACKEND",
    "encryption_key": "TOKEN_ENCRYPTION_KEY",
    "body_encoding": "BODY_ENCODING",
    **{name: name.upper() for name in TUNING_NAMES},
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, kw_only=True, repr=False)
class Settings(Tuning):
    """A TokenManager's configuration: credentials, endpoint, backend and tuning.

    It has every option of ``cl_tokens.Tuning`` (same names, same defaults) besides
    the fields below. Build one directly, with ``from_env`` or with ``from_mapping``;
    ``TokenManager.from_settings(settings)`` turns it into a manager. ``repr`` never
    shows the secret or the encryption key.

    Args:
        client_id: the API credentials' client id (required).
        client_secret: the client secret; None for sales-channel credentials.
        scope: the default scope, e.g. ``market:code:europe``; None for none.
        auth_url: the token endpoint.
        backend: where tokens are shared, as a URL: ``memory://`` (this process only),
            ``file:///var/cache/cl-tokens`` (the processes of a machine) or
            ``redis://localhost:6379/0`` (every machine). A ``file://`` URL needs an
            absolute directory: ``file:///var/cache/cl-tokens``, three slashes.
        encryption_key: a Fernet key to encrypt the tokens a file or redis backend
            stores (needs ``pip install 'cl-tokens[encryption]'``); to rotate keys,
            list them comma-separated, new first: the first encrypts, all decrypt.
            Each key is checked here, and reported under this field's name.
        body_encoding: ``"json"`` (Commerce Layer) or ``"form"`` (RFC 6749 servers).

    Every option of ``Tuning`` (``safety_margin``, ``attempts``, ...) is a field too.

    Raises:
        ConfigurationError: listing every invalid field by name.
    """

    client_id: str
    client_secret: str | None = None
    scope: str | None = None
    auth_url: str = DEFAULT_AUTH_URL
    backend: str = DEFAULT_BACKEND
    encryption_key: str | None = None
    body_encoding: BodyEncoding = "json"

    def __post_init__(self) -> None:
        # Replaces Tuning's check, which would read the non-tuning fields as tuning.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        problems = _problems(values)
        if problems:
            raise ConfigurationError(_message("invalid Settings", problems, {}))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = "CL_") -> Settings:
        """Settings from environment variables: ``CL_CLIENT_ID`` (required),
        ``CL_CLIENT_SECRET``, ``CL_SCOPE``, ``CL_AUTH_URL``, ``CL_TOKEN_BACKEND``,
        ``CL_TOKEN_ENCRYPTION_KEY``, ``CL_BODY_ENCODING`` and ``CL_`` + each tuning
        option in upper case (``CL_SAFETY_MARGIN``, ..., ``CL_STRICT``).

        An empty variable counts as unset. Booleans read 1/0, true/false, yes/no,
        on/off in any case.

        Args:
            environ: the variables to read (default: ``os.environ``).
            prefix: what every variable name starts with.

        Raises:
            ConfigurationError: listing every missing or invalid variable by name.
        """
        return settings_from_sources(env_sources(environ, prefix))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Settings:
        """Settings from a mapping keyed by field name (``client_id``, ``safety_margin``...).

        Values may be typed (``30.0``, ``True``) or text (``"30"``, ``"yes"``), as from
        a config file; None or ``""`` counts as unset.

        Args:
            mapping: field name -> value.

        Raises:
            ConfigurationError: naming unknown keys and every missing or invalid value.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigurationError(
                f"settings must be a mapping of field names, not {type(mapping).__name__}"
            )
        known = sorted(ENV_NAMES)
        unknown = []
        for key in mapping:
            if key in ENV_NAMES:
                continue
            close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
            shown = safe_text(repr(key), 40)
            unknown.append(shown + (f" (did you mean {close[0]!r}?)" if close else ""))
        if unknown:
            raise ConfigurationError(
                f"unknown settings: {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return settings_from_sources({name: (value, name) for name, value in mapping.items()})

    @property
    def tuning(self) -> Tuning:
        """The tuning options alone, as a ``Tuning``."""
        return Tuning(**{name: getattr(self, name) for name in TUNING_NAMES})

    def manager_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``TokenManager`` these settings stand for."""
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "scope": self.scope,
            "auth_url": self.auth_url,
            "backend": self.backend,
            "backend_options": self._backend_options(),
            "body_encoding": self.body_encoding,
            **{name: getattr(self, name) for name in TUNING_NAMES},
        }

    def _backend_options(self) -> dict[str, Any] | None:
        if not self.encryption_key:
            return None
        keys = [key.strip() for key in self.encryption_key.split(",") if key.strip()]
        return {"encryption_key": keys[0] if len(keys) == 1 else keys}

    def __repr__(self) -> str:
        # Secrets show only whether they are set; tuning only where it differs from the
        # default, so the repr stays readable.
        parts = [
            f"client_id={self.client_id!r}",
            f"client_secret={'<set>' if self.client_secret else None}",
            f"scope={self.scope!r}",
            f"auth_url={redact_url(self.auth_url)!r}",
            f"backend={redact_url(self.backend)!r}",
        ]
        if self.encryption_key:
            parts.append("encryption_key=<set>")
        parts.append(f"body_encoding={self.body_encoding!r}")
        for name in TUNING_NAMES:
            value = getattr(self, name)
            if value != _TUNING_DEFAULTS[name]:
                parts.append(f"{name}={value!r}")
        return f"Settings({', '.join(parts)})"


# -- building from sources ---------------------------------------------------------------

#: field name -> (raw value, the name the user gave it as, for messages)
Sources = dict[str, tuple[Any, str]]


def env_sources(environ: Mapping[str, str] | None, prefix: str = "CL_") -> Sources:
    """The set variables of ``environ`` as sources, labelled by variable name.

    Args:
        environ: the variables (default: ``os.environ``).
        prefix: what every variable name starts with.
    """
    env = os.environ if environ is None else environ
    sources: Sources = {}
    for name, suffix in ENV_NAMES.items():
        variable = prefix + suffix
        value = env.get(variable)
        if value is not None:
            sources[name] = (value, variable)
    sources.setdefault("client_id", (None, prefix + ENV_NAMES["client_id"]))
    return sources


def settings_from_sources(sources: Sources) -> Settings:
    """Parse and check every source, then build Settings or raise one error for all.

    Args:
        sources: field name -> (value, label); text values are parsed by field type.

    Raises:
        ConfigurationError: every problem, each under its source's label.
    """
    labels = {name: label for name, (_, label) in sources.items()}
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, (raw, _) in sources.items():
        if raw is None or raw == "":
            continue  # unset: the default applies
        try:
            values[name] = _parse(name, raw)
        except ValueError as exc:
            problems.append((name, str(exc)))
    failed = {name for name, _ in problems}
    for name, why in _problems({**values, "client_id": values.get("client_id")}):
        if name not in failed:
            problems.append((name, why))
    if problems:
        raise ConfigurationError(_message("invalid settings", problems, labels))
    return Settings(**values)


def _parse(name: str, raw: Any) -> Any:
    """``raw`` as the type of field ``name``; text is parsed, other values pass as-is."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if name in _BOOLEAN_NAMES:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"must be true or false (1/0, yes/no, on/off), not {_shown(raw)}")
    if name in ("attempts", "max_customers"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"must be a whole number such as 3, not {_shown(raw)}") from None
    if name in TUNING_NAMES:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"must be a number of seconds such as 30, not {_shown(raw)}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number of seconds, not {_shown(raw)}")
        return number
    if name == "body_encoding":
        return text.lower()
    return raw  # credentials, scope and URLs are kept exactly as written


_PLAIN_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ -_")
_PLAIN_NUMBER = frozenset("0123456789.eE+-_ ")


def _shown(raw: str) -> str:
    """A bad value for an error message, or only its length when it may be a secret.

    A value in the wrong variable may be a pasted client secret, key or URL with
    credentials. Only a short plain word (``maybe``) or number (``-5``, ``1e400``) is
    quoted; anything else is named by its length, never echoed.
    """
    text = raw.strip()
    chars = set(text)
    short = len(text) < 8 or (len(text) <= 16 and (chars <= _PLAIN_WORD or chars <= _PLAIN_NUMBER))
    if short and text.isprintable() and "://" not in text and "@" not in text:
        return repr(text)
    return f"a {len(raw)}-character value (not shown: it may be a secret)"


def _problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem of typed ``values`` as (field name, reason); absent fields default."""
    problems: list[tuple[str, str]] = []
    client_id = values.get("client_id")
    if client_id is None or client_id == "":
        problems.append(("client_id", "is required"))
    for name in _TEXT_FIELDS:
        value = values.get(name)
        if value is None or (name == "client_id" and value == ""):
            continue
        if not isinstance(value, str) or not value:
            problems.append((name, "must be a non-empty string"))
        elif value != value.strip():
            # A pasted value with a stray space or newline is rejected by the server
            # with a confusing 401; say so here instead.
            problems.append((name, "has leading or trailing whitespace"))
    backend = values.get("backend", DEFAULT_BACKEND)
    url_problem = auth_url_problem(values.get("auth_url", DEFAULT_AUTH_URL))
    if url_problem:
        problems.append(("auth_url", url_problem))
    if isinstance(backend, str):
        problems.extend(_backend_problems(backend, values.get("encryption_key")))
    body_encoding = values.get("body_encoding", "json")
    if body_encoding not in ("json", "form"):
        shown = _shown(body_encoding) if isinstance(body_encoding, str) else repr(body_encoding)
        problems.append(("body_encoding", f"must be json or form, not {shown}"))
    problems.extend(tuning_problems(_unchecked_tuning(values)))
    # One reason per field: a value that is not even a string has no scheme to check.
    first: dict[str, str] = {}
    for name, why in problems:
        first.setdefault(name, why)
    return list(first.items())


def _backend_problems(backend: str, encryption_key: object) -> list[tuple[str, str]]:
    """The problems of the backend URL and of the encryption key that goes with it.

    Each is reported under its own name: a bad key is the key's problem, not the
    backend's. What only a backend can tell (a redis:// database, a reachable host) is
    left to the backend.
    """
    problems: list[tuple[str, str]] = []
    schemes = known_schemes()
    try:
        scheme: str | None = split_userinfo(backend)[0].lower()
    except ValueError:
        scheme = None
    if scheme is None:
        # Not a URL at all: maybe a value pasted into the wrong variable, so cut short.
        problems.append(
            (
                "backend",
                "must be a URL such as memory://, file:///var/cache/cl-tokens or "
                f"redis://localhost:6379/0, not {_shown(backend)}",
            )
        )
    elif scheme not in schemes:
        problems.append(
            (
                "backend",
                f"has an unknown scheme {scheme!r} in {redact_url(backend)!r} "
                f"(known: {', '.join(s + '://' for s in schemes)})",
            )
        )
    elif scheme == "file":
        url_problem = file_url_problem(backend)
        if url_problem:
            problems.append(("backend", f"{redact_url(backend)!r}: {url_problem}"))
    if isinstance(encryption_key, str) and encryption_key:
        if scheme == "memory":
            problems.append(
                (
                    "encryption_key",
                    "is only used by backends that store tokens outside the process "
                    "(file://, redis://), not memory://",
                )
            )
        elif encryption_key == encryption_key.strip():  # else already reported
            key_problem = _encryption_key_problem(encryption_key)
            if key_problem:
                problems.append(("encryption_key", key_problem))
    return problems


def _encryption_key_problem(text: str) -> str | None:
    """Why ``text`` (Fernet keys, comma-separated) cannot encrypt, or None.

    The same check the backends' codec makes when it loads the keys, done here so the
    problem is named by the key's variable. Never echoes a key.
    """
    keys = [key.strip() for key in text.split(",") if key.strip()]
    if not keys:
        return "has no key; give one Fernet key, or several separated by commas"
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        return "needs the encryption extra: pip install 'cl-tokens[encryption]'"
    for position, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            which = f" (key #{position} of {len(keys)})" if len(keys) > 1 else ""
            return (
                f"is not a Fernet key{which}: it must be url-safe base64 of 32 bytes; make "
                "one with cryptography.fernet.Fernet.generate_key()"
            )
    return None


def _unchecked_tuning(values: Mapping[str, Any]) -> Tuning:
    """A Tuning built without its own check, so ``tuning_problems`` can report each
    option under its own name instead of Tuning's one joined message."""
    tuning = object.__new__(Tuning)
    for name in TUNING_NAMES:
        object.__setattr__(tuning, name, values.get(name, _TUNING_DEFAULTS[name]))
    return tuning


def _message(intro: str, problems: list[tuple[str, str]], labels: Mapping[str, str]) -> str:
    order = list(ENV_NAMES)
    problems = sorted(problems, key=lambda problem: order.index(problem[0]))
    listed = "; ".join(f"{labels.get(name, name)} {why}" for name, why in problems)
    return f"{intro}: {listed}"
