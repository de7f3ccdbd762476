"""The multi-host benchmark (``python -m benchmarks --only hosts``) skips with a reason
where it cannot make network namespaces, and records that reason instead of failing.

The benchmark itself takes about a minute and needs root, so it is not run here; where
namespaces can be made, the one test below builds its topology and tears it down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``pytest`` (not ``python -m pytest``) leaves the root out
    sys.path.insert(0, str(ROOT))

from benchmarks import _netns  # noqa: E402
from benchmarks.report import rows  # noqa: E402
from benchmarks.run import main  # noqa: E402


def test_without_ip_on_path_the_probe_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _netns.unavailable() == "the ip command (iproute2) is not on PATH"


def test_without_root_the_probe_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _netns.unavailable() == "network namespaces need root (running as uid 1000)"


def test_a_failing_netns_add_is_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    def refuse(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["ip", *args], 1, "", "mount --make-shared: denied")

    monkeypatch.setattr(_netns, "_ip", refuse)
    assert _netns.unavailable() == "`ip netns add` failed: mount --make-shared: denied"


def test_a_skipped_run_records_the_reason_and_keeps_the_other_sections(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    previous = {"meta": {"command": "python -m benchmarks"}, "stress": {"kept": True}}
    (out / "results.json").write_text(json.dumps(previous))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    assert main(["--only", "hosts", "--out", str(out)]) == 0

    written = json.loads((out / "results.json").read_text())
    assert written["hosts"] == {"skipped": "the ip command (iproute2) is not on PATH"}
    assert written["stress"] == {"kept": True}
    table = (out / "results.md").read_text()
    assert "skipped: the ip command (iproute2) is not on PATH" in table
    assert "skipped: the ip command" in capsys.readouterr().err


def test_the_skip_row_has_no_verdict() -> None:
    (row,) = rows({"hosts": {"skipped": "no redis-server binary on PATH"}})
    assert row.passed is None
    assert row.measured == "skipped: no redis-server binary on PATH"


@pytest.mark.skipif(_netns.unavailable() is not None, reason="needs root and ip netns")
def test_the_topology_is_built_cut_and_removed() -> None:
    def links() -> str:
        return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout

    def namespaces() -> str:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    with _netns.topology(("a", "b")) as topo:
        assert topo.namespace("a") in namespaces()
        inner = subprocess.run(
            [*topo.exec_args("a"), "ip", "-o", "-4", "addr", "show", "eth0"],
            capture_output=True,
            text=True,
        ).stdout
        assert f"{topo.addresses['a']}/24" in inner
        asyncio.run(topo.set_link("b", up=False))
        assert "state DOWN" in next(x for x in links().splitlines() if topo.veths["b"] in x)
        asyncio.run(topo.set_link("b", up=True))
    assert topo.prefix not in namespaces()
    assert f"{topo.tag}b" not in links()
