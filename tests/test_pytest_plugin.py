"""The pytest plugin, used as a user would: a suite elsewhere, the installed package."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

PLUGIN_USER = Path(__file__).parent / "plugin_user"


def test_the_plugin_is_registered_as_an_entry_point() -> None:
    (entry,) = importlib.metadata.entry_points(group="pytest11", name="cl_tokens")
    assert entry.value == "cl_tokens.testing.pytest_plugin"


def test_a_separate_suite_uses_the_fixtures(tmp_path: Path) -> None:
    suite = tmp_path / "their_project"
    shutil.copytree(PLUGIN_USER, suite)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CL_", "PYTEST_"))}
    env.pop("PYTHONPATH", None)  # only what is installed
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA"],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 passed" in run.stdout, run.stdout
    assert "cl-tokens-" in run.stdout.split("plugins:", 1)[1].splitlines()[0]


def test_the_plugin_can_be_turned_off(tmp_path: Path) -> None:
    suite = tmp_path / "their_project"
    shutil.copytree(PLUGIN_USER, suite)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:cl_tokens"],
        cwd=suite,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "fixture 'cl_fake_auth' not found" in run.stdout
