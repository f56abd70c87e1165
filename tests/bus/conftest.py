"""Buses on loopback for the bus tests: in this process, or in a peer process of their own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from service.bus import Bus
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]

# Fast but not twitchy: the suite shares its cores with other work.
FAST = {
    "bus_heartbeat_interval_s": 0.2,
    "bus_suspect_after_s": 0.6,
    "bus_dead_after_s": 1.5,
    "bus_dns_interval_s": 0.2,
}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The bus tests run on the node's loop (uvicorn runs uvloop). The loop
    decides, after a stall, whether a woken timer runs before a readable
    socket is read: with asyncio's loop the socket comes first."""
    return {"uvloop": uvloop.new_event_loop}


def bus_settings(node_id: str, **overrides: Any) -> Settings:
    return Settings(node_id=node_id, **(FAST | overrides))


@dataclass
class Sink:
    """An InvalidationSink that records what it was told."""

    invalidated: list[tuple[list[str], int | None]] = field(default_factory=list)
    older_than: list[int | None] = field(default_factory=list)

    def invalidate(self, keys: Sequence[str], lsn: int | None) -> None:
        self.invalidated.append((list(keys), lsn))

    def invalidate_older_than(self, lsn: int | None) -> None:
        self.older_than.append(lsn)

    @property
    def keys(self) -> list[str]:
        return [k for keys, _ in self.invalidated for k in keys]


StartBus = Callable[..., Awaitable[Bus]]


@pytest.fixture
async def start_bus() -> AsyncIterator[StartBus]:
    """start_bus(node_id, **settings) -> a started Bus, closed when the test ends."""
    started: list[Bus] = []

    async def start(node_id: str, *, resolver: Any = None, **overrides: Any) -> Bus:
        kwargs = {"resolver": resolver} if resolver is not None else {}
        bus = Bus(bus_settings(node_id, **overrides), status=lambda: {"state": "ready"}, **kwargs)
        started.append(bus)
        await bus.start()
        return bus

    yield start
    for bus in started:
        await bus.close(2.0)


async def until(predicate: Callable[[], object], timeout_s: float) -> float | None:
    """Seconds until `predicate()` held on the running loop, or None (bounded)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < timeout_s:
        if predicate():
            return loop.time() - started
        await asyncio.sleep(0.005)
    return None


class PeerProcess:
    """tests/bus/peer.py as a child process; killed by its PID when the test ends."""

    def __init__(self, node_id: str, *args: str, env: dict[str, str] | None = None) -> None:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
        child_env |= {f"CATTLE_{k.upper()}": str(v) for k, v in FAST.items()}
        child_env |= {"CATTLE_NODE_ID": node_id, "PYTHONPATH": str(REPO)} | (env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bus.peer", *args],
            cwd=REPO,
            env=child_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first:
            self.kill()
            raise AssertionError(f"peer {node_id} did not start (exit {self.proc.returncode})")
        self.info = json.loads(first)
        self.endpoint: str = self.info["endpoint"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def terminate_and_report(self, timeout_s: float) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout_s)
        return json.loads(out.strip().splitlines()[-1])

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped child cannot die of SIGKILL late
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def peer_process() -> Iterator[Callable[..., PeerProcess]]:
    peers: list[PeerProcess] = []

    def start(node_id: str, *args: str, env: dict[str, str] | None = None) -> PeerProcess:
        peer = PeerProcess(node_id, *args, env=env)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.kill()
