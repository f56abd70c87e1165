"""Process identity (deploy/lab/procs.py): a process caught in exec() is not "gone"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.lab import procs


def test_a_process_is_ours_by_its_marker_and_not_once_it_is_gone() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        env={**os.environ, "LAB_TEST_MARK": "yes"},
    )
    try:
        assert procs.is_ours(child.pid, "LAB_TEST_MARK")
        assert not procs.is_ours(child.pid, "SOME_OTHER_MARK")
    finally:
        child.kill()
        child.wait()
    assert not procs.is_ours(child.pid, "LAB_TEST_MARK")


def test_an_empty_identity_while_exec_runs_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # While exec() replaces a process's image, /proc/<pid>/cmdline and
    # environ read empty for a moment; the next read shows the new program.
    reads = {"count": 0}

    class Exec:
        def __init__(self, path: str) -> None:
            self.path = path

        def read_bytes(self) -> bytes:
            reads["count"] += 1
            return b"" if reads["count"] <= 4 else b"python\0-m\0service\0MARK=1\0"

    monkeypatch.setattr(procs, "Path", Exec)
    monkeypatch.setattr(procs, "_state", lambda _pid: "R")

    assert procs.is_ours(12345, "MARK=1")
    assert reads["count"] == 5  # two empty reads per look, twice, then the marker


def test_a_readable_identity_without_the_marker_is_not_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(procs, "Path", lambda _p: Path("/proc/self/cmdline"))
    monkeypatch.setattr(procs, "_state", lambda _pid: "S")
    assert not procs.is_ours(12345, "A_MARK_NOBODY_HAS")
