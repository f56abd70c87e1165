"""When `make demo`'s load does not start, the error says what became of its
process: its log can be empty (a process killed before it wrote a line)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from deploy.lab import demo


def _child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def _settled_fate(pid: int) -> str:
    """Its fate once it no longer runs (bounded: an exit or a kill lands within moments)."""
    for _ in range(200):
        fate = demo._fate(pid)
        if "still runs" not in fate:
            break
        time.sleep(0.05)
    return fate


def test_the_fate_of_a_load_that_did_not_start_is_named() -> None:
    exited = _child("raise SystemExit(3)")
    exited.wait(timeout=30)  # Popen reaped it: _fate finds no child left
    assert demo._fate(exited.pid) == f"process {exited.pid} is gone"

    running = _child("import time; time.sleep(30)")
    try:
        assert (
            demo._fate(running.pid)
            == f"process {running.pid} still runs, but has not written its counts"
        )
        running.send_signal(signal.SIGKILL)
        assert (
            _settled_fate(running.pid)
            == f"process {running.pid} was killed by signal {int(signal.SIGKILL)}"
        )
    finally:
        running.kill()

    failing = _child("raise SystemExit(3)")
    assert _settled_fate(failing.pid) == f"process {failing.pid} exited with status 3"
