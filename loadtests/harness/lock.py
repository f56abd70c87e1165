"""The machine-wide experiment lock: two measurements never compete for the CPU.

Throughput figures mean something only if nothing else competes for the
CPU, so every full experiment and benchmark runs under this one lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

# Machine-wide on purpose: every checkout on this machine must see the same lock.
LOCK_PATH = Path("/tmp/cattle-experiments.lock")  # noqa: S108


@contextlib.contextmanager
def exclusive(name: str, timeout_s: float = 1800) -> Iterator[None]:
    """Hold the machine-wide experiment lock (waiting at most `timeout_s`)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + timeout_s
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"{name}: waiting for another experiment to finish ({LOCK_PATH})")
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: the experiment lock stayed busy") from None
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, f"{name} pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
