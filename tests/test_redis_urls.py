"""Redis URLs: one server, a Cluster with several seeds, a Sentinel group; passwords
with raw URL characters parsed right and never shown."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from cl_tokens import BackendError, ConfigurationError
from cl_tokens.backends import RedisBackend, backend_from_url


def _single(backend: RedisBackend) -> Redis:
    assert isinstance(backend.client, Redis)
    return backend.client


NASTY_PASSWORD = "p/a#s?s@w%25rd:x"  # percent-encoded "%" only; the rest raw


def test_cluster_urls_take_several_seeds_and_tls() -> None:
    from redis.asyncio import RedisCluster

    backend = backend_from_url(
        f"rediss+cluster://alice:{NASTY_PASSWORD}@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"
        "?socket_timeout=4"
    )
    assert isinstance(backend, RedisBackend)
    client = backend.client
    assert isinstance(client, RedisCluster)
    seeds = {(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()}
    assert seeds == {("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)}
    kwargs = client.nodes_manager.connection_kwargs
    assert kwargs["password"] == "p/a#s?s@w%rd:x"
    assert kwargs["username"] == "alice"
    assert kwargs["socket_timeout"] == 4.0
    assert kwargs["connection_class"].__name__ == "SSLConnection"
    text = repr(backend)
    assert text == (
        "RedisBackend(url='rediss+cluster://alice:***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/0',"
        " encrypted=False)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000/15",
        "redis+cluster://127.0.0.1:7000?db=2",
        f"rediss+cluster://:{NASTY_PASSWORD}@h1:7000,h2:7000/3",
    ],
)
def test_a_cluster_database_other_than_0_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="database 0") as caught:
        backend_from_url(url)
    for fragment in ("p/a", "s?s", "w%rd", "rd:x"):
        assert fragment not in str(caught.value)


def test_sentinel_urls_name_the_service_and_database() -> None:
    backend = backend_from_url(
        f"redis+sentinel://:{NASTY_PASSWORD}@127.0.0.1:26379,127.0.0.2/my%20primary/4"
        "?sentinel_password=sentinel-pw&socket_timeout=2"
    )
    assert isinstance(backend, RedisBackend)
    pool = _single(backend).connection_pool
    assert type(pool).__name__ == "SentinelConnectionPool"
    assert pool.service_name == "my primary"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["db"] == 4
    assert pool.connection_kwargs["password"] == "p/a#s?s@w%rd:x"
    manager = pool.sentinel_manager  # type: ignore[attr-defined]
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in manager.sentinels
    ] == [("127.0.0.1", 26379), ("127.0.0.2", 26379)]
    assert manager.sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-pw"
    assert repr(backend) == (
        "RedisBackend(url='redis+sentinel://:***@127.0.0.1:26379,127.0.0.2:26379/my primary/4',"
        " encrypted=False)"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "service name"),
        ("redis+sentinel://127.0.0.1:26379/", "service name"),
        ("redis+sentinel://h:26379/svc/x", "must be a number"),
        ("redis+sentinel://h:26379/svc/1/2", "too many"),
        ("redis://h1:6379,h2:6379/0", r"redis\+cluster://"),
        ("redis+cluster://h1:99999", "not a valid URL"),
        ("redis+cluster://h1:7000,,h2", "host"),
        ("redis://127.0.0.1/0?socket_timeout=soon", "socket_timeout"),
        ("redis://127.0.0.1/0?no_such_option=1", "no_such_option"),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        backend_from_url(url)


def test_a_password_with_raw_url_characters_stays_out_of_messages() -> None:
    for scheme in ("redis", "rediss"):
        backend = backend_from_url(f"{scheme}://user:{NASTY_PASSWORD}@127.0.0.1:6390/2")
        assert isinstance(backend, RedisBackend)
        kwargs = _single(backend).connection_pool.connection_kwargs
        assert (kwargs["password"], kwargs["db"], kwargs["port"]) == ("p/a#s?s@w%rd:x", 2, 6390)
        assert (
            repr(backend)
            == f"RedisBackend(url='{scheme}://user:***@127.0.0.1:6390/2', encrypted=False)"
        )
    from cl_tokens.backends._base import redact_url

    shown = redact_url(f"redis+cluster://u:{NASTY_PASSWORD}@h1:1,h2:2/0?password=x")
    assert shown == "redis+cluster://u:***@h1:1,h2:2/0?password=***"


async def test_a_dead_cluster_seed_is_a_backend_error() -> None:
    backend = backend_from_url("redis+cluster://127.0.0.1:1,127.0.0.1:2", socket_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        await backend.get("k")
    assert time.monotonic() - started < 10
    assert caught.value.__cause__ is not None
    await backend.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:s3cr/et@h:26379/svc/notanumber",
        "redis+cluster://user:s3cr/et@h1:7000,h2:7000/1",
        "redis://user:12/s3cret@h:6379/notanumber",
    ],
)
def test_parse_errors_never_echo_the_url(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url(url)
    assert "s3cr" not in str(caught.value)
    assert "et@h" not in str(caught.value)
