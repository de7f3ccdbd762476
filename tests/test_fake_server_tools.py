"""The fake server as users run it: standalone, under uvloop, with a key set to verify by."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from cl_tokens import JWKSVerifier, TokenError, TokenManager
from cl_tokens.testing import FakeAuthServer, _fake_keys


@pytest.fixture
def standalone() -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """``python -m cl_tokens.testing serve`` on a free port, and the lines it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cl_tokens.testing", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        printed = dict(line.rstrip("\n").split("=", 1) for line in lines)
        yield process, printed
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_standalone_server_then_the_cli_end_to_end(
    standalone: tuple[subprocess.Popen[str], dict[str, str]], tmp_path: Path
) -> None:
    process, printed = standalone
    assert sorted(printed) == ["CL_AUTH_URL", "CL_CLIENT_ID", "CL_CLIENT_SECRET"]
    assert printed["CL_AUTH_URL"].startswith("http://127.0.0.1:")
    assert printed["CL_AUTH_URL"].endswith("/oauth/token")
    assert len(printed["CL_CLIENT_SECRET"]) >= 32  # random, not a well-known default
    env = {k: v for k, v in os.environ.items() if not k.startswith("CL_")}
    env.update(printed, XDG_CACHE_HOME=str(tmp_path))
    runs = [
        subprocess.run(
            [sys.executable, "-m", "cl_tokens", "token"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout  # the second from the cache
    token = runs[0].stdout.strip()
    base = printed["CL_AUTH_URL"].removesuffix("/oauth/token")

    async def verify() -> dict[str, object]:
        async with JWKSVerifier(issuers=[base]) as verifier:
            return await verifier.verify(token)

    claims = asyncio.run(verify())
    assert claims["iss"] == base
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


def test_standalone_server_stops_on_sigint(
    standalone: tuple[subprocess.Popen[str], dict[str, str]],
) -> None:
    process, _ = standalone
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()


def test_standalone_server_on_a_taken_port_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "cl_tokens.testing", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 1
    assert run.stderr.startswith("python -m cl_tokens.testing: error: ")
    assert "Traceback" not in run.stderr


def test_standalone_sales_channel_has_no_secret() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "cl_tokens.testing", "serve", "--sales-channel"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert lines[2] == "CL_CLIENT_SECRET=\n"


# -- the key set -------------------------------------------------------------------------------


async def test_jwks_verifier_verifies_a_fake_server_token(server: FakeAuthServer) -> None:
    async with (
        TokenManager(server.client_id, server.client_secret, auth_url=server.url) as manager,
        JWKSVerifier(issuers=[server.base_url]) as verifier,
    ):
        token = await manager.token()
        claims = await verifier.verify(token)
    assert claims["organization"] == {"id": "fakeOrgId", "slug": server.organization_slug}
    header = json.loads(base64.urlsafe_b64decode(token.access_token.split(".")[0] + "=="))
    assert header["alg"] == "RS512"


async def test_a_forged_fake_server_token_does_not_verify(server: FakeAuthServer) -> None:
    # The attacker edits the payload of a genuine token (another organization) and
    # keeps the signature: the key set must not vouch for it.
    async with TokenManager(server.client_id, server.client_secret, auth_url=server.url) as m:
        token = (await m.token()).access_token
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["organization"]["slug"] = "someone-else"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    async with JWKSVerifier(issuers=[server.base_url]) as verifier:
        with pytest.raises(TokenError, match="signature does not match"):
            await verifier.verify(f"{head}.{forged_payload}.{signature}")


async def test_without_cryptography_tokens_are_unsigned_and_the_key_set_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fake_keys, "_KEY", [])
    for name in [name for name in sys.modules if name.split(".")[0] == "cryptography"]:
        monkeypatch.setitem(sys.modules, name, None)  # every import of it now fails
    async with FakeAuthServer() as fake:
        assert fake.signed is False
        async with TokenManager(fake.client_id, fake.client_secret, auth_url=fake.url) as m:
            token = await m.token()
        assert token.claims is not None  # still JWT-shaped, claims readable
        assert len(token.access_token.split(".")) == 3
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(fake.jwks_url) as response:
            assert await response.json() == {"keys": []}


# -- uvloop --------------------------------------------------------------------------------------


def test_fake_server_and_manager_run_under_uvloop() -> None:
    async def main() -> tuple[int, str, str]:
        loop_type = type(asyncio.get_running_loop()).__module__
        async with (
            FakeAuthServer() as fake,
            TokenManager(fake.client_id, fake.client_secret, auth_url=fake.url) as manager,
        ):
            tokens = await asyncio.gather(*(manager.token() for _ in range(50)))
            async with JWKSVerifier(issuers=[fake.base_url]) as verifier:
                claims = await verifier.verify(tokens[0])
            return fake.token_requests, loop_type, str(claims["iss"])

    requests, loop_type, iss = uvloop.run(main())
    assert loop_type.startswith("uvloop")
    assert requests == 1
    assert iss.startswith("http://127.0.0.1:")
