"""Detached lab processes, found again by PID from another command.

`up` starts processes that outlive it; `kill`, `restart` and `down` run later
as new commands. Each process is identified by its PID *and* a marker in its
command line or environment, so a recycled PID is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def spawn(
    argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `up`, and a Ctrl+C at the terminal
        )
    return proc.pid


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def is_ours(pid: int | None, marker: str) -> bool:
    """Alive (not a zombie) and carrying `marker` in its command line or environment.

    A process in the middle of exec() (a node's `sh` wrapper becoming Python)
    shows an empty command line and environment for a moment: read again
    rather than call it gone, which once failed a lab's `up` and left the
    node running.
    """
    for _ in range(_EXEC_READS):  # bounded
        if not pid or _state(pid) in (None, "Z", "X"):
            return False
        seen = 0
        for name in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                data = Path(f"/proc/{pid}/{name}").read_bytes()
                if marker.encode() in data:
                    return True
                seen += len(data)
        if seen:
            return False  # readable, and not ours
        time.sleep(_EXEC_PAUSE_S)
    return False


_EXEC_READS = 20
_EXEC_PAUSE_S = 0.005


def ended(pid: int) -> str | None:
    """How our child `pid` ended, or None while it still runs.

    The second opinion on an `is_ours` that says no while a process starts: a
    process caught in exec() (`sh`, `nice` and `ip netns exec` each exec the
    next) can look gone or foreign for a moment on a busy machine, and must
    not fail a start that is going well. Only the kernel's exit status is
    taken as proof.
    """
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "exited"  # already reaped (or never ours): it is gone
    if waited == 0:
        return None
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def reap(pid: int) -> None:
    """Collect the exit status if the process is our child (no zombie left)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_pid(pid: int | None, marker: str, sig: int) -> bool:
    if pid is None or not is_ours(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        return True
    return False


def wait_gone(pid: int, marker: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reap(pid)
        if not is_ours(pid, marker):
            return True
        time.sleep(0.02)
    return not is_ours(pid, marker)


def stop(pid: int | None, marker: str, *, timeout_s: float, sig: int = signal.SIGTERM) -> None:
    """`sig`, a bounded wait, then SIGKILL: the process is gone when this returns."""
    if pid is None or not signal_pid(pid, marker, sig):
        return
    if not wait_gone(pid, marker, timeout_s):
        signal_pid(pid, marker, signal.SIGKILL)
        wait_gone(pid, marker, 5.0)
