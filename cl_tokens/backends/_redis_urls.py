"""Redis URLs for one server, a Cluster or a Sentinel group, and the clients built from them.

    redis[s]://[user:password@]host[:port][/db][?options]
    redis[s]+cluster://[user:password@]host1[:port1][,host2[:port2]...][/0][?options]
    redis[s]+sentinel://[user:password@]s1[:p1][,s2[:p2]...]/<service>[/<db>][?options]

urllib cannot parse a list of hosts, and cuts a password with a raw ``/``, ``#`` or ``?``
in it into the path or the fragment, so these URLs are parsed here, once. The user info
is the data nodes' (for Sentinel: the primary's and replicas'); Sentinels that need their
own credentials take ``?sentinel_username=...&sentinel_password=...``. Options are
redis-py's connection keywords, typed the way ``redis.from_url`` types them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import unquote

from .._errors import ConfigurationError
from ._base import split_userinfo

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    RedisClient: TypeAlias = Redis | RedisCluster

__all__ = ["SCHEMES", "RedisTarget", "build_client", "parse_redis_url"]

SCHEMES = (
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
_DEFAULT_PORT = {"single": 6379, "cluster": 6379, "sentinel": 26379}
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::([0-9]{1,5}))?")
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL. ``safe`` is fit for messages: no password, no query."""

    kind: str  # "single", "cluster" or "sentinel"
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    db: int
    service: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    query: str = field(default="", repr=False)

    @property
    def safe(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + (
            "" if self.kind == "single" else "+" + self.kind
        )
        user = self.username or ""
        if self.password is not None:
            user += ":***"
        hosts = ",".join(f"{_bracket(h)}:{p}" for h, p in self.hosts)
        path = f"/{self.service}/{self.db}" if self.service is not None else f"/{self.db}"
        return f"{scheme}://{user + '@' if user else ''}{hosts}{path}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any of the module's URL forms.

    Raises:
        ConfigurationError: not one of them; the message never holds the password or
            the query (which may hold one).
    """
    try:
        scheme, userinfo, rest = split_userinfo(url)
    except ValueError:
        scheme = ""
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(
            "RedisBackend takes " + ", ".join(s + "://" for s in SCHEMES) + " URLs, "
            f"not {scheme + '://' if scheme else 'this value'}"
        )
    tls = scheme.startswith("rediss")
    kind = scheme.partition("+")[2] or "single"
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    hosts = []
    for part in netloc.split(","):
        match = _HOST.fullmatch(part)
        if match is None:
            # Nothing of the URL is echoed: a misplaced password may be in it.
            raise ConfigurationError(
                f"{scheme}:// URL: hosts must read host[:port][,host[:port]...]"
            )
        port = int(match.group(2)) if match.group(2) else _DEFAULT_PORT[kind]
        if not 0 < port < 65536:
            raise ConfigurationError(f"{scheme}:// URL: port {port} is out of range")
        hosts.append((unquote(match.group(1).strip("[]")), port))
    if kind == "single" and len(hosts) > 1:
        raise ConfigurationError(
            f"{scheme}:// takes one host; for several use {scheme}+cluster:// (Redis Cluster) "
            f"or {scheme}+sentinel:// (Sentinel)"
        )
    username = password = None
    if userinfo is not None:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    segments = [unquote(s) for s in path.split("/")] if slash else []
    segments = [s for s in segments if s] if kind != "sentinel" else segments
    service = None
    if kind == "sentinel":
        if not segments or not segments[0]:
            raise ConfigurationError(
                f"{scheme}:// URL needs the service name: "
                f"{scheme}://host:26379[,host:26379...]/<service>[/<db>]"
            )
        service, segments = segments[0], [s for s in segments[1:] if s]
    if len(segments) > 1:
        raise ConfigurationError(f"{scheme}:// URL has too many path segments")
    db = _db(scheme, segments[0]) if segments else 0
    for name, value in _query_pairs(query):
        if name == "db":
            db = _db(scheme, value)
    if kind == "cluster" and db != 0:
        raise ConfigurationError(
            f"Redis Cluster has only database 0; {scheme}:// URL asks for database {db}"
        )
    return RedisTarget(kind, tls, tuple(hosts), db, service, username, password, query)


def _db(scheme: str, text: str) -> int:
    if not text.isdigit() or len(text) > 6:
        raise ConfigurationError(f"{scheme}:// URL: the database must be a number")
    return int(text)


def _query_pairs(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query, keep_blank_values=True)


def _query_options(target: RedisTarget) -> dict[str, Any]:
    """The URL's options, typed as redis-py types them (``socket_timeout=3`` a float)."""
    from redis.asyncio.connection import parse_url

    options: dict[str, Any] = dict(parse_url("redis://?" + target.query)) if target.query else {}
    options.pop("db", None)  # already in target.db
    return options


def build_client(
    target: RedisTarget, socket_timeout: float, options: dict[str, Any]
) -> RedisClient:
    """A client for ``target``: short timeouts and one quick retry, unless the URL's
    options or ``options`` say otherwise (the URL's win, as in ``redis.from_url``).

    Nothing connects here: the first command does.
    """
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import ExponentialWithJitterBackoff

    settings: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # One quick retry heals a pooled connection that a Redis restart broke; the
        # default (10 retries) would hold the token path for seconds on a dead server.
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1),
        **options,
    }
    try:
        settings.update(_query_options(target))
    except ValueError as exc:
        raise ConfigurationError(f"{target.safe}: {exc}") from None
    if target.username is not None:
        settings.setdefault("username", target.username)
    if target.password is not None:
        settings.setdefault("password", target.password)
    try:
        if target.kind == "cluster":
            nodes = [ClusterNode(host, port) for host, port in target.hosts]
            return RedisCluster(startup_nodes=nodes, ssl=target.tls, **settings)
        if target.kind == "sentinel":
            assert target.service is not None  # noqa: S101 - the parser requires it (for mypy)
            sentinel_settings = {
                k: v for k, v in settings.items() if k.startswith("socket_") or k == "retry"
            }
            for name in _SENTINEL_AUTH:
                if name in settings:
                    sentinel_settings[name.removeprefix("sentinel_")] = settings.pop(name)
            if target.tls:
                sentinel_settings["ssl"] = True
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.hosts), sentinel_kwargs=sentinel_settings
            )
            primary: Redis = sentinel.master_for(
                target.service, db=target.db, ssl=target.tls, **settings
            )
            return primary
        host, port = target.hosts[0]
        return Redis(host=host, port=port, db=target.db, ssl=target.tls, **settings)
    except TypeError as exc:
        # An option redis-py does not know (a typo in the query or in the keywords).
        raise ConfigurationError(f"{target.safe}: {exc}") from None
