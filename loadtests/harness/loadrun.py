"""One locust run against a lab, with the resources every party used meanwhile.

The experiments (scale-out, node loss) are built from this: start locust in
a child process, sample CPU of the load generator, the nodes and the whole
machine once a second, let the caller act on the lab at chosen moments, and
hand back every request and every sample. Figures come from the requests;
the samples decide whether a run is valid (was the load generator, not the
nodes, the bottleneck?).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.lab import cgroups
from loadtests import REPO_ROOT
from loadtests.harness import machine


@dataclass
class Sample:
    t: float  # wall-clock seconds
    loadgen_cpu: float  # cores used by the load generator since the last sample
    machine_busy: float  # fraction of all cores busy since the last sample
    node_cpu: dict[str, float]  # cores used per node since the last sample
    node_throttled: dict[str, float]  # share of CFS periods throttled since the last sample


@dataclass
class LoadResult:
    rows: list[list[Any]]
    columns: list[str]
    prefix: str
    started: float
    ended: float
    samples: list[Sample] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def column(self, name: str) -> int:
        return self.columns.index(name)


class _Sampler:
    def __init__(self, loadgen_pid: int, nodes: list[dict[str, Any]]) -> None:
        self.loadgen_pid = loadgen_pid
        self.nodes = nodes
        self.last_t = time.monotonic()
        self.last_loadgen = machine.cpu_seconds(loadgen_pid)
        self.last_machine = machine.machine_jiffies()
        self.last_nodes = {n["id"]: self._node_cpu(n) for n in nodes}
        self.last_throttle = {n["id"]: self._throttle(n) for n in nodes}

    @staticmethod
    def _node_cpu(node: dict[str, Any]) -> float | None:
        try:
            return machine.cpu_seconds(node["pid"])
        except (OSError, TypeError):
            return None

    @staticmethod
    def _throttle(node: dict[str, Any]) -> tuple[int, int]:
        if not node.get("cgroup"):
            return (0, 0)
        stats = cgroups.CpuGroup(Path(node["cgroup"])).throttling()
        return stats.get("nr_periods", 0), stats.get("nr_throttled", 0)

    def take(self) -> Sample | None:
        now = time.monotonic()
        elapsed = now - self.last_t
        if elapsed <= 0:
            return None
        try:
            loadgen = machine.cpu_seconds(self.loadgen_pid)
        except OSError:
            return None
        busy, total = machine.machine_jiffies()
        node_cpu, node_throttled = {}, {}
        for node in self.nodes:
            used = self._node_cpu(node)
            before = self.last_nodes.get(node["id"])
            if used is not None and before is not None and used >= before:
                node_cpu[node["id"]] = (used - before) / elapsed  # (a restart resets it)
            self.last_nodes[node["id"]] = used
            periods, throttled = self._throttle(node)
            p0, t0 = self.last_throttle[node["id"]]
            if periods > p0:
                node_throttled[node["id"]] = (throttled - t0) / (periods - p0)
            self.last_throttle[node["id"]] = (periods, throttled)
        busy0, total0 = self.last_machine
        sample = Sample(
            t=time.time(),
            loadgen_cpu=(loadgen - self.last_loadgen) / elapsed,
            machine_busy=(busy - busy0) / (total - total0) if total > total0 else 0.0,
            node_cpu=node_cpu,
            node_throttled=node_throttled,
        )
        self.last_t, self.last_loadgen, self.last_machine = now, loadgen, (busy, total)
        return sample


def run_load(
    host: str,
    nodes: list[dict[str, Any]],
    *,
    users: int,
    duration_s: float,
    mix: str = "read-mostly",
    rate_per_user: float | None = None,
    seed_notes: int = 200,
    schedule: list[tuple[float, str, Callable[[], Any]]] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    phases: tuple[int, list[tuple[float, int]]] | None = None,
) -> LoadResult:
    """Drive `host` with locust for `duration_s`, running `schedule` events on time.

    `schedule` is [(seconds after the load starts, label, action)]. `nodes`
    are lab.json node entries whose CPU and throttling are sampled (their
    pids may change when an event restarts one: pass the same dicts and
    update them in place). `phases` (shares, [(seconds, active shares)]):
    the users split into equal shares, of which only the active ones send
    (loadtests/harness/locust_run.py, Phases).
    """
    with tempfile.TemporaryDirectory(prefix="cattle-load-") as tmp:
        out = Path(tmp) / "requests.json"
        argv = [
            sys.executable, "-m", "loadtests.harness.locust_run",
            "--host", host, "--users", str(users), "--duration-s", str(duration_s),
            "--mix", mix, "--seed-notes", str(seed_notes), "--out", str(out),
            "--started-file", str(Path(tmp) / "started"),
        ]  # fmt: skip
        if rate_per_user is not None:
            argv += ["--rate-per-user", str(rate_per_user)]
        if phases is not None:
            shares, steps = phases
            argv += ["--shares", str(shares), "--phases", ",".join(f"{t:g}:{n}" for t, n in steps)]
        log = Path(tmp) / "locust.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ
            )
        try:
            samples, events = _watch(
                proc, Path(tmp) / "started", nodes, duration_s, schedule or [], on_sample
            )
            proc.wait(timeout=duration_s + seed_notes * 0.1 + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"locust run failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
        data = json.loads(out.read_text())
    return LoadResult(
        rows=data["rows"],
        columns=data["columns"],
        prefix=data["prefix"],
        started=data["started"],
        ended=data["ended"],
        samples=samples,
        events=events,
    )


def _watch(
    proc: subprocess.Popen[bytes],
    started_file: Path,
    nodes: list[dict[str, Any]],
    duration_s: float,
    schedule: list[tuple[float, str, Callable[[], Any]]],
    on_sample: Callable[[Sample], None] | None,
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Sample once a second; run each scheduled event on time, in its own thread
    (a restart takes seconds and must not delay the next event)."""
    deadline = time.monotonic() + 120
    while not started_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # locust seeds its notes first; the schedule counts from the load
    start = time.monotonic()
    sampler = _Sampler(proc.pid, nodes)
    samples: list[Sample] = []
    events: list[dict[str, Any]] = []
    pending = sorted(schedule, key=lambda item: item[0])
    running: list[threading.Thread] = []

    def fire(at_s: float, label: str, action: Callable[[], Any]) -> None:
        event: dict[str, Any] = {"label": label, "at_s": at_s, "t": time.time(), "error": None}
        events.append(event)
        try:
            action()
        except Exception as exc:  # the run goes on; the report says what failed
            event["error"] = f"{type(exc).__name__}: {exc}"
        event["done_t"] = time.time()

    end = start + duration_s + 60
    while proc.poll() is None and time.monotonic() < end:
        tick = time.monotonic()
        while pending and tick - start >= pending[0][0]:
            thread = threading.Thread(target=fire, args=pending.pop(0), daemon=True)
            thread.start()
            running.append(thread)
        time.sleep(min(1.0, max(0.05, (pending[0][0] - (tick - start)) if pending else 1.0)))
        sample = sampler.take() if time.monotonic() - sampler.last_t >= 0.95 else None
        if sample is not None:
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
    for thread in running:
        thread.join(timeout=120)
    return samples, events
