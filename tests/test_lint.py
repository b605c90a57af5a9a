"""Lint is part of the test suite: ruff over all Python, shellcheck over every shell script."""

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    result = _run(os.path.join(BIN, "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = _run(os.path.join(BIN, "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck():
    scripts = [
        ".ci/run",
        *glob.glob("tools/*.sh", root_dir=ROOT),
        *glob.glob("scripts/**/*.sh", root_dir=ROOT, recursive=True),
    ]
    result = _run(os.path.join(BIN, "shellcheck"), "--external-sources", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr
