"""The command line from the installed package."""

from __future__ import annotations

import subprocess
import sys

import ferrotune


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferrotune", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ferrotune {ferrotune.__version__}"
    out = run("--help")
    assert out.returncode == 0 and "usage: ferrotune" in out.stdout


def test_unknown_command_is_an_error():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
