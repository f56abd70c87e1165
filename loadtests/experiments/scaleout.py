"""Scale-out experiment: does throughput grow linearly with the number of nodes?

Nodes are CPU-capped (cgroup v1 `cpu`, the same fraction of a core each), so
one machine behaves like N small ones; locust drives the lab through HAProxy
to saturation and counts steady-state throughput after a warm-up.

The machine drifts, at times by tens of percent within a minute, so N
values are never compared across minutes: a block starts labs of k nodes
(as many as make Plan.fleet_nodes nodes) and, beside them, Plan.references
labs of one node, loads them all at once, and counts windows of seconds,
the same seconds for every lab (the default design; `--design alternating`
serves N=1 and N=k in turn from one lab). Each window is a pair, and the
efficiency E(k) = X(k) / (k X(1)) is taken within it, X(k) the mean of the
fleets of k and X(1) the mean of the fleets of one. A block's windows share its
labs and their node processes, which stay a few percent faster or slower
than others started alike for as long as they run, so the blocks are the
repeats: blocks repeat, round-robin over k, until the interval of E(k) over
the blocks' means is narrow (Plan.ci_width) or a bound on pairs or time is
reached; the report gives per k the median of the pair ratios, each block's
mean, and the 95% Student-t interval over the blocks. Throughput per
CPU-second the serving nodes used (read from their cgroups) is reported
beside it: it leaves out how much CPU a node got, not how fast the machine
ran that CPU (a capped node here always gets its share; its requests per
CPU-second move with the machine as its throughput does).

A run is valid only if every run's nodes were the bottleneck (every node
throttled by its cap in most periods and using its share, the load
generator with headroom, the machine not saturated) *and* its blocks agree:
a k whose interval is still wider than Plan.ci_width when the pairs stop
makes the run not valid, whatever the per-node checks say. A second run
given the first's report (--agree-with) states per k whether the two
medians are within half that width, and is not valid where they are not.

The Universal Scalability Law is fitted on N = 1, 2, 4 only (capacities
relative to N=1 within each pair, so the drift stays out) and its prediction
of X(8) is set against the X(8) measured in the same run; the fit is what
`python -m loadtests.capacity` plans with. Results go to
docs/results/scaleout.{md,json,png}.

    python -m loadtests.experiments.scaleout            # the full run (tens of minutes)
    python -m loadtests.experiments.scaleout --smoke    # a minute: checks the code, not the machine
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import service
from deploy.lab import cgroups, haproxy
from deploy.lab.cluster import Lab, LabOptions
from loadtests import report as reports
from loadtests.harness import analysis, cgroupcpu, machine, paired
from loadtests.harness.loadrun import LoadResult, Sample, run_load
from loadtests.harness.locust_run import MIX_NAMES
from loadtests.harness.usl import band, fit_usl, peak_n, usl
from service.config import Settings, env_var
from service.telemetry.http import AccessLog

RESULTS = reports.RESULTS / "scaleout"
# Side by side, each load runs this much past the last window: the two start
# seconds apart (each seeds its own notes first), and both must cover it.
SIDE_BY_SIDE_SLACK_S = 10.0
# A report's `stopped` while the run goes on (--refresh-plot writes one after every pair).
IN_PROGRESS = "not yet: the run is in progress"

# Per-run validity thresholds (documented in docs/results/README.md).
LOADGEN_MAX_CORES = 0.8  # one locust process: keep it well short of its core
NODE_MIN_THROTTLED = 0.5  # a saturated capped node is throttled in most periods
NODE_MIN_SHARE = 0.85  # ... and uses (nearly) all of its cap
MACHINE_MAX_BUSY = 0.95  # the machine itself must not be the limit
MAX_ERROR_RATE = 0.01

Point = dict[str, Any]
# A block: one lab of k nodes, one load, segments serving 1 or k nodes in the
# given orders (one (first, second) pair per entry); a Point per segment.
# `first` is the index of the block's first pair over the run.
MeasureBlock = Callable[[int, list[tuple[int, int]], int, Path], list[Point]]


@dataclass(frozen=True)
class Plan:
    ns: tuple[int, ...] = (1, 2, 4, 8)
    # "side-by-side": a fleet of k and a fleet of one, loaded at the same time
    # (measure_side_by_side); "alternating": one lab serving N=1 and N=k in
    # turn, seconds apart (measure_block).
    design: str = "side-by-side"
    # Every node on one core (the machine's last), everything else on the
    # others: the machine's host slows one core at a time (by up to half, for
    # seconds), and side by side both fleets then see the same core.
    pin: bool = True
    cpu: float = 0.05
    # The CFS period the cap is enforced over. In the kernel's 100 ms a node at
    # 0.05 core runs 5 ms and waits 95: HAProxy's leastconn then sends a fleet's
    # requests to the nodes inside their 5 ms, which can serve more per
    # CPU-second than a lone node (a pilot block came out well above linear);
    # a 1 ms run in every 20 keeps a capped node's pauses short.
    cpu_period_ms: float = 20.0
    # Closed-loop users per node (alternating: a block starts k times as many,
    # in k equal shares, and only the serving nodes' shares send). Enough to
    # keep a node at its cap; with 20 at 0.05 core a node's own health check
    # waited over a second behind its queue, failed, and HAProxy took it out.
    users_per_node: int = 10
    warmup_s: float = 8.0
    # Each segment: settle_s after the switch (not counted), then measure_s.
    settle_s: float = 3.0
    measure_s: float = 12.0
    backend: str = "postgres"
    # Each user sends every kind of request in a fixed cycle, so any window
    # holds the same mix at every N (loadtests/clients/notes.py, MixedUser).
    mix: str = "read-mostly-cycle"
    # Side by side: how many fleets of one run beside the fleet of k; X(1) is
    # their mean (one node process can stay a few percent faster or slower
    # per CPU-second than another for as long as it runs, and with one fleet
    # of one that went into every E(k) of its block).
    references: int = 4
    # Side by side: the fleets of k repeat until they hold this many nodes
    # (fleet_nodes // k fleets, at least one), X(k) their mean; None: as
    # many as the largest N. So every block runs as many node processes on
    # the k side at every k, and as many in all: E(2) averages over 8
    # processes, as E(8) does, and the machine is as busy at N=2 as at N=8.
    # 0: one fleet of k.
    fleet_nodes: int | None = None
    # Pairs per block (side by side: windows of measure_s under one load).
    # A block's windows share its labs and their node processes, so the
    # blocks are the repeats (block_means) and the interval is over them:
    # short blocks, and many. Blocks round-robin over k; at least min_pairs
    # per k (alternating: an even number, so both orders count alike), more
    # until the 95% interval of E(k) over its blocks is at most ci_width wide,
    # never more than max_pairs, and no new block once max_minutes have passed.
    block_pairs: int = 4
    min_pairs: int = 16
    max_pairs: int = 40
    # The stated spread: E(k) known to within +-ci_width/2. A k whose
    # interval is still wider when the pairs stop makes the run not valid
    # (its repeats disagree), and a second run agrees with a first when
    # every E(k) median is within ci_width/2 of the first's (--agree-with).
    ci_width: float = 0.10
    max_minutes: float = 60.0
    # Side by side: the order a block brings its labs up and starts their
    # loads. Whichever labs come up first serve less per CPU-second for as
    # long as their processes run (docs/results: scaleout-start-order), so:
    # "balanced": the places in that order are taken in mirror pairs (first
    # and last, second and second to last, ...), every other pair going to
    # the fleets of k, from the outermost pair in a k's even blocks and from
    # the next in its odd ones (a single fleet of k takes the middle place):
    # both sides have the same mean place in every block.
    # "alternate": the fleets of k first in a k's even blocks, the fleets of
    # one first in its odd ones (the blocks then differ by the order effect).
    # "fleets-first": every run before commit a8e669b.
    start: str = "balanced"
    # The USL is fitted on these N only; the largest N of `ns` checks it.
    fit_ns: tuple[int, ...] = (1, 2, 4)
    # The nodes' read cache (service/cache/). Off by default: E(N) is about
    # the node and the shared database, and a hit ratio that moves with what
    # each run happened to write moves the work per request with it. On is
    # the cache's own scale-out (--cache on).
    cache: bool = False
    # The node bus (service/bus/), on as a node ships: each node of a fleet of
    # k hears k-1 peers, a cost a fleet of one does not pay. Off is the
    # control (--bus off): E(N) without the bus, so the difference is its share.
    bus: bool = True
    # The bus's timers (heartbeat interval, suspect and dead bounds, and the
    # ZMTP PINGs that follow the suspect bound). "model": 1/cpu times the
    # shipped ones. A node at `cpu` core stands for a node of one core slowed
    # 1/cpu times: it serves 1/cpu times fewer requests a second, so at the
    # shipped timers it hears each peer 1/cpu times as often per request as
    # the node it stands for, a cost that grows with the peers (docs/results:
    # bus, bus-n2). With the start order balanced, a short pair of runs saw
    # no difference in E(8) (scaleout-balanced-shipped-timers, -model-timers),
    # a full pair 0.04, intervals overlapping (scaleout-shipped, -balanced-third).
    # "shipped": the control, the timers as a node ships.
    bus_timers: str = "model"
    # Notes created before each block's load, for the readers to read.
    seed_notes: int = 200
    # Alternating only: a node out of rotation burns its CPU cap (a spinning process in its
    # cgroup), so the machine is as busy while one node serves as while k do:
    # two cores shared by all the lab's processes run each one slower the
    # busier the other core is, which a fleet of separate machines would
    # not. Off is the control: what that sharing alone does to E(N).
    burn_idle: bool = True


SMOKE = Plan(
    ns=(1, 2),
    cpu=0.25,
    users_per_node=3,
    warmup_s=1.0,
    settle_s=0.5,
    measure_s=2.5,  # two cgroup readings (one a second) at least: CPU per request
    backend="sqlite",
    block_pairs=2,
    min_pairs=2,
    max_pairs=2,
    max_minutes=5.0,
    seed_notes=20,  # seeding 200 takes seconds through a quarter core
    references=2,
    fleet_nodes=4,  # two fleets of 2: the code path of the repeated fleets
    pin=False,  # the suite's other worker shares the cores (pinning has its own test)
)


def fleet_nodes(plan: Plan) -> int:
    """The nodes the fleets of k fill: Plan.fleet_nodes, or the largest N."""
    return max(plan.ns) if plan.fleet_nodes is None else plan.fleet_nodes


def fleets(plan: Plan, k: int) -> int:
    """How many fleets of k a side-by-side block runs (X(k) is their mean)."""
    return max(1, fleet_nodes(plan) // k) if k > 1 else 1


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def serving(k: int, n: int, pair: int) -> list[str]:
    """The nodes that serve the N=n segment of pair `pair` in a lab of k: all k,
    or one, the next one at every pair (one node's own speed is not N=1's)."""
    names = [f"n{i}" for i in range(1, k + 1)]
    return names if n == k else [names[pair % k]]


def _burner(group: Path, log: Path) -> subprocess.Popen[bytes]:
    """A process that spins in `group` (a node's cgroup, so under its cap), stopped."""
    with log.open("wb") as out:
        burner = subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], stdout=out, stderr=subprocess.STDOUT
        )
    os.kill(burner.pid, signal.SIGSTOP)
    try:
        cgroups.CpuGroup(group).add(burner.pid)
    except OSError:
        burner.kill()
        burner.wait(timeout=10)
        raise
    return burner


def _lab_options(plan: Plan, nodes: int) -> LabOptions:
    """A lab of `nodes` as every block of the plan starts it."""
    return LabOptions(
        nodes=nodes,
        backend=plan.backend,
        cpu=plan.cpu,
        cpu_period_ms=plan.cpu_period_ms,
        drain_delay_s=0.5,
        node_env=({} if plan.cache else {f"{service.ENV_PREFIX}CACHE": "off"})
        | ({} if plan.bus else {f"{service.ENV_PREFIX}BUS": "false"})
        | {env_var(name): f"{seconds:g}" for name, seconds in bus_timers(plan).items()},
    )


# The bus's timer settings the model's clock stretches; the PINGs follow the suspect bound.
BUS_TIMERS = ("bus_heartbeat_interval_s", "bus_suspect_after_s", "bus_dead_after_s")


def bus_timers(plan: Plan) -> dict[str, float]:
    """The bus timer settings every node of the plan starts with, where they
    differ from the shipped ones (Plan.bus_timers)."""
    if not plan.bus or plan.bus_timers == "shipped" or plan.cpu >= 1:
        return {}
    return {name: Settings.model_fields[name].default / plan.cpu for name in BUS_TIMERS}


def _cgroup_reader(
    state: dict[str, Any],
    readings: list[tuple[float, dict[str, float]]],
    sources: set[str],
) -> Callable[[Sample], None]:
    """At every load sample, the CPU-seconds each node of the lab `state` has used."""
    groups = {node["id"]: Path(node["cgroup"]) for node in state["nodes"] if node["cgroup"]}

    def read(sample: Sample) -> None:
        used = {}
        for node_id, group in groups.items():
            reading = cgroupcpu.cpu_seconds(group)
            if reading is not None:
                used[node_id], source = reading
                sources.add(source)
        readings.append((sample.t, used))

    return read


def measure_block(
    k: int, orders: list[tuple[int, int]], first: int, plan: Plan, run_dir: Path
) -> list[Point]:
    """One block: a lab of k nodes under one load, segments serving 1 or k of them.

    Between segments HAProxy's rotation changes (the others in MAINT), not
    the lab or the load: the segments of a pair are seconds apart, closer than
    the machine's drift, and no lab start or locust start sits between them.
    """
    lab = Lab(run_dir)
    lab.up(_lab_options(plan, k))
    # (N, the nodes serving it) of every segment, in order, and when it is
    # switched to (seconds into the load; the first is set before the load).
    plan_segments = [(n, serving(k, n, first + p)) for p, order in enumerate(orders) for n in order]
    segment_s = plan.settle_s + plan.measure_s
    switched_at = [0.0] + [plan.warmup_s + i * segment_s for i in range(1, len(plan_segments))]
    readings: list[tuple[float, dict[str, float]]] = []
    sources: set[str] = set()
    burners: dict[str, subprocess.Popen[bytes]] = {}
    try:
        state = lab.load()
        socket_path = Path(state["haproxy"]["socket"])
        names = [node["id"] for node in state["nodes"]]

        if plan.burn_idle:
            for node in state["nodes"]:
                burners[node["id"]] = _burner(
                    Path(node["cgroup"]), run_dir / f"burn-{node['id']}.log"
                )

        def switch(nodes: list[str]) -> Callable[[], None]:
            def act() -> None:
                for name in nodes:  # the serving nodes' CPU first, then the rotation
                    if name in burners:
                        os.kill(burners[name].pid, signal.SIGSTOP)
                haproxy.serve_only(socket_path, nodes, names)
                for name, burner in burners.items():
                    if name not in nodes:
                        os.kill(burner.pid, signal.SIGCONT)

            return act

        switch(plan_segments[0][1])()
        schedule = [
            (at, f"serve {' '.join(nodes)}", switch(nodes))
            for at, (_, nodes) in zip(switched_at[1:], plan_segments[1:], strict=True)
        ]
        result = run_load(
            state["front"],
            state["nodes"],
            users=k * plan.users_per_node,
            duration_s=plan.warmup_s + len(plan_segments) * segment_s,
            mix=plan.mix,
            seed_notes=plan.seed_notes,
            schedule=schedule,
            on_sample=_cgroup_reader(state, readings, sources),
            # Every serving node has the users of one node: k shares, n active.
            phases=(k, [(at, n) for at, (n, _) in zip(switched_at, plan_segments, strict=True)]),
        )
        cache = cache_counts([node["url"] for node in state["nodes"]])
    finally:
        for burner in burners.values():
            burner.kill()  # SIGKILL ends a stopped process too
            burner.wait(timeout=10)
        lab.down()
    # The node logs stay in the run directory after the lab is down: read when a
    # segment went wrong, once.
    logs: dict[str, list[str]] = {}
    points = []
    for i, (n, nodes) in enumerate(plan_segments):
        start = plan.warmup_s + i * segment_s + plan.settle_s  # the first too: after the warm-up
        point = _point(n, plan, result, start, nodes)
        point.update(_cpu_used(result, start, plan.measure_s, readings, sources, nodes))
        point.update(cache)
        if point["failed"] or set(point["by_node"]) != set(nodes):
            # Something a node would say: what each one logged last, beside the figures.
            logs = logs or {node["id"]: node_log_tail(Path(node["log"])) for node in state["nodes"]}
            point["node_logs"] = logs
        points.append(point)
    return points


def node_core() -> int | None:
    """The core the nodes are pinned to (the last one), None on a one-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[-1] if len(cores) > 1 else None


@contextlib.contextmanager
def infrastructure_off_core(core: int | None) -> Iterator[None]:
    """This process, and what it starts meanwhile (databases, HAProxy, locust,
    nodes until pinned), kept off `core`; the affinity it had, afterwards."""
    before = os.sched_getaffinity(0)
    if core is not None:
        os.sched_setaffinity(0, before - {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure_side_by_side(
    k: int, orders: list[tuple[int, int]], first: int, plan: Plan, run_dir: Path
) -> list[Point]:
    """One block side by side: `fleets(plan, k)` labs of k nodes and
    `plan.references` labs of one, each under its own load of
    `users_per_node` users per node, at the same time.

    Each lab has its own HAProxy and database, so a fleet of one is the N=1
    of the sequential design, not a node of the k. Windows of measure_s, the
    same seconds for every load, make the pairs: whatever slows the machine
    in a window (a core slowed by the host, a busy database core) slows every
    fleet in it. X(1) of a window is the mean of the fleets of one: one node
    process serves a steady few percent more or less per CPU-second than
    another started alike, for as long as it runs, and a single one would put
    that into every E(k) of its block. X(k) is likewise the mean of the
    fleets of k. `orders` only gives the pairs' count and the order their
    points are returned in.
    """
    core = node_core() if plan.pin else None
    count = fleets(plan, k)
    ks = [f"fleet-{k}"] if count == 1 else [f"fleet-{k}-{j}" for j in range(1, count + 1)]
    lone = [f"one-{i}" for i in range(1, plan.references + 1)]
    sizes = {label: k if label in ks else 1 for label in start_order(ks, lone, first, plan)}
    labs = {label: Lab(run_dir / label) for label in sizes}
    # Per lab (each names its first node n1): (time, CPU-seconds per node).
    readings: dict[str, list[tuple[float, dict[str, float]]]] = {label: [] for label in labs}
    sources: set[str] = set()
    duration_s = plan.warmup_s + len(orders) * plan.measure_s + SIDE_BY_SIDE_SLACK_S
    with infrastructure_off_core(core):
        try:
            states = {}
            for label, lab in labs.items():
                lab.up(_lab_options(plan, sizes[label]))
                states[label] = lab.load()
                if core is not None:
                    for node in states[label]["nodes"]:
                        machine.pin_process(node["pid"], {core})
            with concurrent.futures.ThreadPoolExecutor(len(labs)) as pool:
                loads = {
                    label: pool.submit(
                        run_load,
                        state["front"],
                        state["nodes"],
                        users=sizes[label] * plan.users_per_node,
                        duration_s=duration_s,
                        mix=plan.mix,
                        seed_notes=plan.seed_notes,
                        on_sample=_cgroup_reader(state, readings[label], sources),
                    )
                    for label, state in states.items()
                }
                results = {label: future.result() for label, future in loads.items()}
            cache = {
                label: cache_counts([node["url"] for node in state["nodes"]])
                for label, state in states.items()
            }
        finally:
            for lab in labs.values():
                lab.down()
    # The windows: the same seconds of every load, from the latest start's warm-up on.
    common = max(result.started for result in results.values()) + plan.warmup_s
    points: list[Point] = []
    for p, order in enumerate(orders):
        window = {}
        for label, result in results.items():
            state = states[label]
            start = common + p * plan.measure_s - result.started
            names = [node["id"] for node in state["nodes"]]
            point = _point(sizes[label], plan, result, start, names)
            point.update(_cpu_used(result, start, plan.measure_s, readings[label], sources, names))
            point.update(cache[label])
            point["pinned_core"] = core
            if point["failed"] or set(point["by_node"]) != set(names):
                point["node_logs"] = {
                    node["id"]: node_log_tail(Path(node["log"])) for node in state["nodes"]
                }
            window[label] = point
        ones = {label: point for label, point in window.items() if label not in ks}
        by_n = {
            k: merge_fleets({label: window[label] for label in ks}),
            1: merge_fleets(ones),
        }
        points.extend(by_n[n] for n in order)
    return points


def start_order(ks: list[str], ones: list[str], first: int, plan: Plan) -> list[str]:
    """The labs of the block whose first pair is `first`, in the order they come
    up and start their loads (Plan.start)."""
    odd = (first // plan.block_pairs) % 2 == 1
    if plan.start == "fleets-first" or (plan.start == "alternate" and not odd):
        return [*ks, *ones]
    if plan.start == "alternate":
        return [*ones, *ks]
    count = len(ks) + len(ones)
    mirror = [(place, count - 1 - place) for place in range(count // 2)]
    pairs = mirror[odd::2] + mirror[(not odd) :: 2]  # the k side's, in preference
    places: list[int] = [count // 2] if count % 2 and len(ks) % 2 else []
    for pair in pairs:
        if len(places) + 2 <= len(ks):
            places.extend(pair)
    if len(places) < len(ks):  # an odd k side and an even count: the free place nearest the middle
        free = [place for pair in pairs for place in pair if place not in places]
        places.append(min(free, key=lambda place: abs(2 * place - (count - 1))))
    k_side, one_side = iter(ks), iter(ones)
    return [next(k_side) if place in places else next(one_side) for place in range(count)]


def merge_fleets(parts: dict[str, Point]) -> Point:
    """One N's point of a window from its fleets of that size, by lab (one: as it is).

    Throughput is their mean (X(N) is one fleet's); counts and CPU are
    summed, requests per CPU-second taken over the sums; latencies are the
    median of theirs. Nodes are named lab/node (one-1/n1, one-2/n1...);
    each fleet's own throughput is kept (fleet_rps).
    """
    points = list(parts.values())
    if len(points) == 1:
        return points[0]
    merged: Point = {"n": points[0]["n"]}
    merged["serving"] = [f"{lab}/{node}" for lab, p in parts.items() for node in p["serving"]]
    for key in ("by_node", "nodes"):
        merged[key] = {f"{lab}/{n}": v for lab, p in parts.items() for n, v in p[key].items()}
    logs = {f"{lab}/{n}": v for lab, p in parts.items() for n, v in p.get("node_logs", {}).items()}
    if logs:
        merged["node_logs"] = logs
    merged["by_kind"] = dict(sum((Counter(p["by_kind"]) for p in points), Counter()))
    for key in ("requests", "failed", "loadgen_cpu_cores", "cache_hits", "cache_misses"):
        counts = [p.get(key) for p in points]
        merged[key] = None if any(v is None for v in counts) else sum(counts)
    merged["throughput_rps"] = statistics.fmean(p["throughput_rps"] for p in points)
    merged["fleet_rps"] = [p["throughput_rps"] for p in points]
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        latencies: list[float] = [p[key] for p in points if p.get(key) is not None]
        merged[key] = statistics.median(latencies) if latencies else None
    busy = [p["machine_busy"] for p in points if p.get("machine_busy") is not None]
    merged["machine_busy"] = max(busy) if busy else None
    used = [(p["node_cpu_s"], p["requests_per_cpu_s"]) for p in points]
    if all(cpu is not None and rate is not None for cpu, rate in used):
        cpu_s = sum(cpu for cpu, _ in used)
        served = sum(cpu * rate for cpu, rate in used)
        merged["node_cpu_s"] = cpu_s
        merged["requests_per_cpu_s"] = served / cpu_s if cpu_s else None
    else:
        merged["node_cpu_s"] = merged["requests_per_cpu_s"] = None
    spans = [p["cpu_span_s"] for p in points if p.get("cpu_span_s") is not None]
    merged["cpu_span_s"] = statistics.fmean(spans) if spans else None
    merged["cpu_source"] = points[0].get("cpu_source")
    hits, misses = merged["cache_hits"], merged["cache_misses"]
    reads = (hits or 0) + (misses or 0)
    merged["cache_hit_ratio"] = hits / reads if hits is not None and reads else None
    merged["pinned_core"] = points[0].get("pinned_core")
    merged["problems"] = [f"{lab}: {m}" for lab, p in parts.items() for m in p["problems"]]
    merged["valid"] = all(p["valid"] for p in points)
    return merged


# What every access line holds, as the node encodes it (service.telemetry.http.AccessLog).
_ACCESS_LINE = json.dumps({"logger": AccessLog.LOGGER})[1:-1]


def node_log_tail(log: Path, lines: int = 20) -> list[str]:
    """The last `lines` of a node's log other than its access lines (warnings,
    errors, tracebacks, lifecycle); [] when the log is gone."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    kept = [line for line in text.splitlines() if _ACCESS_LINE not in line]
    return kept[-lines:]


def cache_counts(urls: list[str]) -> dict[str, Any]:
    """The nodes' read-cache hits and misses over the whole run (warm-up too), from /metrics."""
    hits = misses = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310
                text = response.read().decode()
        except OSError:
            return {"cache_hits": None, "cache_misses": None, "cache_hit_ratio": None}
        hits += _counter(text, f"{service.NAME}_cache_hits_total")
        misses += _counter(text, f"{service.NAME}_cache_misses_total")
    reads = hits + misses
    return {
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_ratio": hits / reads if reads else None,
    }


def _counter(text: str, name: str) -> float:
    """A counter's value in Prometheus text (0 when the node does not export it)."""
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _cpu_used(
    result: LoadResult,
    start_s: float,
    seconds: float,
    readings: list[tuple[float, dict[str, float]]],
    sources: set[str],
    serving: list[str],
) -> dict[str, Any]:
    """Requests per CPU-second the serving nodes used, between the first and last
    cgroup readings inside the measured window (requests counted over the same span)."""
    lo, hi = result.started + start_s, result.started + start_s + seconds
    inside = [(t, used) for t, used in readings if lo <= t <= hi]
    empty = {"node_cpu_s": None, "cpu_span_s": None, "requests_per_cpu_s": None}
    if len(inside) < 2:
        return empty | {"cpu_source": None}
    (t0, first), (t1, last) = inside[0], inside[-1]
    cpu_s = sum(last[node] - first[node] for node in first.keys() & last.keys() & set(serving))
    ok = result.column("ok"), result.column("t")
    served = sum(1 for row in result.rows if row[ok[0]] and t0 <= row[ok[1]] < t1)
    return {
        "node_cpu_s": cpu_s,
        "cpu_span_s": t1 - t0,
        "requests_per_cpu_s": served / cpu_s if cpu_s > 0 else None,
        "cpu_source": ", ".join(sorted(sources)) or None,
    }


def _point(n: int, plan: Plan, result: LoadResult, start: float, serving: list[str]) -> Point:
    """A segment's figures and checks: its measured window, its serving nodes."""
    end = start + plan.measure_s
    figures = analysis.summarize(result, analysis.window(result, start, end), plan.measure_s)
    lo, hi = result.started + start, result.started + end
    # A sample covers the second before it: those wholly inside the window,
    # or (a window shorter than two samples, as a smoke run's) those touching it.
    samples = [s for s in result.samples if lo + 1 <= s.t <= hi] or [
        s for s in result.samples if lo < s.t <= hi + 1
    ]
    nodes = {
        node: {
            "cpu_cores": _mean([s.node_cpu[node] for s in samples if node in s.node_cpu]),
            "throttled_share": _mean(
                [s.node_throttled[node] for s in samples if node in s.node_throttled]
            ),
        }
        for node in serving
    }
    loadgen = _mean([s.loadgen_cpu for s in samples])
    busy = _mean([s.machine_busy for s in samples])
    problems = []
    if loadgen is None or loadgen > LOADGEN_MAX_CORES:
        problems.append(f"load generator used {loadgen or 0:.2f} cores (max {LOADGEN_MAX_CORES})")
    for node, use in nodes.items():
        throttled, cores = use["throttled_share"] or 0.0, use["cpu_cores"] or 0.0
        if throttled < NODE_MIN_THROTTLED or cores < NODE_MIN_SHARE * plan.cpu:
            problems.append(
                f"{node} not saturated: {cores:.3f} cores of {plan.cpu}, "
                f"throttled in {throttled:.0%} of periods"
            )
    others = set(figures["by_node"]) - set(serving)
    if others:
        problems.append(f"nodes out of rotation served requests: {sorted(others)}")
    switches = [e for e in result.events if lo - plan.settle_s - 1 <= e["t"] <= lo]
    for event in switches:
        if event["error"]:
            problems.append(f"{event['label']} failed: {event['error']}")
        elif event["done_t"] > lo:
            problems.append(f"{event['label']} took past the settling time")
    if busy is not None and busy > MACHINE_MAX_BUSY:
        problems.append(f"machine {busy:.0%} busy: the nodes competed for CPU")
    if figures["requests"] and figures["failed"] / figures["requests"] > MAX_ERROR_RATE:
        problems.append(f"{figures['failed']} of {figures['requests']} requests failed")
    return {
        "n": n,
        "serving": serving,
        **figures,
        "loadgen_cpu_cores": loadgen,
        "machine_busy": busy,
        "nodes": nodes,
        "valid": not problems,
        "problems": problems,
    }


def _settled(pairs: list[dict[str, Any]], plan: Plan) -> bool:
    """Enough pairs for k: at least min_pairs, an even count, and a narrow interval
    over its blocks."""
    if len(pairs) < plan.min_pairs or len(pairs) % 2:
        return False
    interval = paired.t_interval(block_means(pairs, plan))
    return interval is not None and interval[1] - interval[0] <= plan.ci_width


def block_means(pairs: list[dict[str, Any]], plan: Plan) -> list[float]:
    """The mean E of each block of `pairs` (of one k), in the order they ran.

    A block's pairs share its labs and its load: they are not independent
    repeats, its labs are. One node process can stay faster or slower per
    CPU-second than another for as long as it runs, so a block's windows
    agree with each other more closely than blocks do, and only the blocks
    say how far a run's E(k) could move.
    """
    blocks: dict[int, list[float]] = {}
    for pair in pairs:
        blocks.setdefault(pair["index"] // plan.block_pairs, []).append(pair["efficiency"])
    return [statistics.fmean(ratios) for _, ratios in sorted(blocks.items())]


def progress(pairs: list[dict[str, Any]], plan: Plan, k: int, first: int, elapsed_s: float) -> str:
    """Where the run is, before a block: its N, its pairs of at most m, time spent and left.

    Time left is the smaller of the time bound and the pairs still allowed at
    the mean pair's duration so far (pairs may stop sooner: an interval narrow).
    """
    most = plan.max_pairs * len([n for n in plan.ns if n != 1])
    count = min(plan.block_pairs, plan.max_pairs - first)
    line = (
        f"block of N=1/N={k}, its pairs {first + 1}-{first + count}: pairs "
        f"{len(pairs) + 1}-{len(pairs) + count} of at most {most}, {elapsed_s / 60:.1f} min in"
    )
    bound_s = max(0.0, plan.max_minutes * 60 - elapsed_s)
    if pairs:
        left_s = min(bound_s, elapsed_s / len(pairs) * (most - len(pairs)))
        line += f", at most {left_s / 60:.1f} min left"
    return line


def pairs_of(k: int, first: int, points: list[Point]) -> list[dict[str, Any]]:
    """A block's segments, two by two, as pairs: E(k) within each."""
    pairs = []
    for p in range(len(points) // 2):
        index = first + p
        order = list(paired.first(index, 1, k))
        runs = dict(zip(order, points[2 * p : 2 * p + 2], strict=True))
        x1, xk = runs[1]["throughput_rps"], runs[k]["throughput_rps"]
        pairs.append(
            {
                "k": k,
                "index": index,
                "order": order,
                "x1_rps": x1,
                "xk_rps": xk,
                "efficiency": xk / (k * x1) if x1 else 0.0,
                "per_cpu_ratio": _ratio(
                    runs[k]["requests_per_cpu_s"], runs[1]["requests_per_cpu_s"]
                ),
                "runs": [runs[1], runs[k]],
            }
        )
    return pairs


def run_pairs(
    plan: Plan,
    measure: MeasureBlock,
    base: Path,
    clock: Callable[[], float] = time.monotonic,
    on_pair: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Blocks of pairs (N=1, N=k), order alternated, round-robin over k.

    Prints where it is before every block and each pair after it, and hands
    the pairs so far to `on_pair` after each block (a report in progress).
    Returns the pairs and why they stopped: every k's interval narrow, the
    pair bound, or the time bound.
    """
    ks = [k for k in plan.ns if k != 1]
    began = clock()
    deadline = began + plan.max_minutes * 60
    pairs: list[dict[str, Any]] = []
    for block in range(-(-plan.max_pairs // plan.block_pairs)):
        open_ks = [k for k in ks if not _settled([p for p in pairs if p["k"] == k], plan)]
        if not open_ks:
            return pairs, "every interval narrow"
        for k in open_ks:
            if clock() > deadline:
                return pairs, f"time bound ({plan.max_minutes:g} min)"
            started = clock()
            first = block * plan.block_pairs
            count = min(plan.block_pairs, plan.max_pairs - first)
            print(progress(pairs, plan, k, first, started - began), flush=True)
            orders = [paired.first(first + p, 1, k) for p in range(count)]
            new = pairs_of(k, first, measure(k, orders, first, base / f"k{k}-block{block}"))
            pairs.extend(new)
            for pair in new:
                print(
                    f"pair {pair['index'] + 1} of N=1/N={k} (order {pair['order']}): "
                    f"X(1)={pair['x1_rps']:.0f}, X({k})={pair['xk_rps']:.0f} req/s, "
                    f"E={pair['efficiency']:.3f}"
                    + "".join(
                        f"; N={r['n']} INVALID: {'; '.join(r['problems'])}"
                        for r in pair["runs"]
                        if not r["valid"]
                    ),
                    flush=True,
                )
            print(f"block of N=1/N={k}: {clock() - started:.0f} s", flush=True)
            if on_pair is not None:
                on_pair(pairs)
    settled = all(_settled([p for p in pairs if p["k"] == k], plan) for k in ks)
    return pairs, "every interval narrow" if settled else f"pair bound ({plan.max_pairs} per k)"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(pairs: list[dict[str, Any]], plan: Plan, stopped: str) -> dict[str, Any]:
    """The report's figures from the pairs: per-N rows, the USL check, the verdict."""
    runs = [run for pair in pairs for run in pair["runs"]]
    x1_runs = [r["throughput_rps"] for r in runs if r["n"] == 1]
    x1 = _median(x1_runs) or 0.0
    x1_stderr = statistics.stdev(x1_runs) / len(x1_runs) ** 0.5 if len(x1_runs) > 1 else 0.0
    problems = [
        f"pair {pair['index'] + 1} of N=1/N={pair['k']}, N={run['n']}: {problem}"
        for pair in pairs
        for run in pair["runs"]
        for problem in run["problems"]
    ]
    rows = [_row(1, [r for r in runs if r["n"] == 1], [])]
    for k in (k for k in plan.ns if k != 1):
        mine = [p for p in pairs if p["k"] == k]
        row = _row(k, [p["runs"][1] for p in mine], mine, plan)
        rows.append(row)
        orders = len({tuple(p["order"]) for p in mine})
        if plan.design == "side-by-side" and row["pairs"] < plan.min_pairs:
            problems.append(f"N={k}: {row['pairs']} pair(s) (at least {plan.min_pairs})")
        elif plan.design != "side-by-side" and (row["pairs"] < plan.min_pairs or orders < 2):
            problems.append(
                f"N={k}: {row['pairs']} pair(s), in {orders} order(s) "
                f"(at least {plan.min_pairs}, in both orders)"
            )
        if row["pairs"] and row["interval_width"] is None:
            problems.append(
                f"N={k}: {len(row['block_means'])} block (an interval over blocks needs "
                "at least two)"
            )
        if row["interval_width"] is not None and not row["narrow"]:
            problems.append(
                f"N={k}: the 95% interval of E({k}) is {row['interval_width']:.3f} wide (at "
                f"most {plan.ci_width:g}): the repeats disagree"
            )
    return {
        "plan": asdict(plan),
        "stopped": stopped,
        "interval": "95% Student-t interval of the mean of the blocks' mean E "
        "(a block's pairs share its labs: the blocks are the repeats)",
        "x1_rps": x1,
        "x1_rps_stderr": x1_stderr,
        "x1_spread": paired.spread(x1_runs),
        "rows": rows,
        "usl": usl_check(pairs, plan, x1, x1_stderr),
        "valid": not problems,
        "problems": problems,
        "pairs": pairs,
    }


def _row(
    n: int, runs: list[Point], pairs: list[dict[str, Any]], plan: Plan | None = None
) -> dict[str, Any]:
    ratios = [p["efficiency"] for p in pairs] if n != 1 else [1.0] * len(runs)
    blocks = block_means(pairs, plan) if n != 1 and plan is not None else []
    interval = paired.t_interval(blocks) if n != 1 else None
    per_cpu = [p["per_cpu_ratio"] for p in pairs if p["per_cpu_ratio"] is not None]
    return {
        "n": n,
        "pairs": len(pairs),
        "throughput_runs": [r["throughput_rps"] for r in runs],
        "throughput_median": _median([r["throughput_rps"] for r in runs]),
        "efficiency_runs": ratios,
        "efficiency_median": _median(ratios),
        "efficiency_mean": _mean(ratios),
        "block_means": blocks,
        "efficiency_interval": list(interval) if interval else None,
        "interval_width": interval[1] - interval[0] if interval else None,
        "narrow": bool(interval and plan and interval[1] - interval[0] <= plan.ci_width),
        "spread": paired.spread(ratios) if n != 1 else None,
        "efficiency_by_order": {
            "1 first": _median([p["efficiency"] for p in pairs if p["order"][0] == 1]),
            f"{n} first": _median([p["efficiency"] for p in pairs if p["order"][0] == n]),
        }
        if n != 1
        else None,
        "requests_per_cpu_s_median": _median(
            [r["requests_per_cpu_s"] for r in runs if r.get("requests_per_cpu_s") is not None]
        ),
        "per_cpu_ratio_median": _median(per_cpu),
        "cache_hit_ratio_median": _median(
            [r["cache_hit_ratio"] for r in runs if r.get("cache_hit_ratio") is not None]
        ),
        "p50_ms": _median([r["p50_ms"] for r in runs if r["p50_ms"] is not None]),
        "p99_ms": _median([r["p99_ms"] for r in runs if r["p99_ms"] is not None]),
        "loadgen_cpu_cores": max((r["loadgen_cpu_cores"] or 0 for r in runs), default=None),
        "machine_busy": max((r["machine_busy"] or 0 for r in runs), default=None),
        "valid": all(r["valid"] for r in runs),
    }


def usl_check(
    pairs: list[dict[str, Any]], plan: Plan, x1: float, x1_stderr: float
) -> dict[str, Any]:
    """The USL fitted on plan.fit_ns only, and its X at the largest N against the measured one.

    Each pair gives a capacity relative to its own N=1 run, k E(k), which the
    drift leaves alone; the fit holds C(1) = 1 and finds sigma and kappa from
    those, and X(N) = X(1) C(N) with X(1) the median of the run's N=1 runs.
    """
    fit_ks = sorted({n for n in plan.fit_ns if n != 1})
    points = [
        {"n": p["k"], "throughput_rps": p["k"] * p["efficiency"]} for p in pairs if p["k"] in fit_ks
    ]
    if len({p["n"] for p in points}) < 2:
        return {"error": f"the fit needs pairs at N = {fit_ks}; this run has N = {list(plan.ns)}"}
    relative = fit_usl(points, lam=1.0)
    if relative is None or "error" in relative:
        return {"error": (relative or {}).get("error", "no fit")}
    fit = relative | {
        "lambda": x1,
        "lambda_stderr": x1_stderr,
        "fit_ns": list(plan.fit_ns),
        "node_cpu": plan.cpu,
        "largest_measured_n": max(plan.ns),
        "peak_n": peak_n(relative["sigma"], relative["kappa"]),
    }
    check_n = max(plan.ns)
    measured = [p["efficiency"] for p in pairs if p["k"] == check_n]
    if check_n in plan.fit_ns or not measured:
        return fit | {"check": None}
    predicted = float(usl(check_n, x1, fit["sigma"], fit["kappa"]))
    measured_rps = x1 * check_n * statistics.median(measured)
    return fit | {
        "check": {
            "n": check_n,
            "predicted_rps": predicted,
            # X(1) is common to both sides: only sigma and kappa's uncertainty.
            "predicted_interval": list(band(fit, check_n)),
            "measured_rps": measured_rps,
            "measured_raw_median_rps": _median([p["xk_rps"] for p in pairs if p["k"] == check_n]),
            "relative_error": predicted / measured_rps - 1 if measured_rps else None,
        }
    }


def agreement(report: dict[str, Any], first: dict[str, Any], path: str) -> dict[str, Any]:
    """This run's E(k) medians against a first run's: within ci_width/2 of it, k agrees.

    The report gains the comparison, and a problem for every k that does not
    agree (or that the first run did not measure): two runs that disagree
    are not a reproduced result, however each came out alone.
    """
    bound = report["plan"]["ci_width"] / 2
    theirs = {row["n"]: row["efficiency_median"] for row in first["rows"]}
    rows = []
    for row in report["rows"][1:]:
        mine, other = row["efficiency_median"], theirs.get(row["n"])
        difference = None if mine is None or other is None else mine - other
        rows.append(
            {
                "n": row["n"],
                "median": mine,
                "first_median": other,
                "difference": difference,
                "agree": difference is not None and abs(difference) <= bound,
            }
        )
    problems = [
        f"N={r['n']}: E({r['n']}) median {_f(r['median'], '.3f')} against "
        f"{_f(r['first_median'], '.3f')} in {path}: the runs disagree (at most {bound:g} apart)"
        for r in rows
        if not r["agree"]
    ]
    first_measured = reports.when(first) if first.get("date") else None
    compared = {"with": path, "first_measured": first_measured, "bound": bound, "rows": rows}
    return report | {
        "agreement": compared | {"agree": not problems},
        "valid": report["valid"] and not problems,
        "problems": report["problems"] + problems,
    }


def load_first(path: Path) -> dict[str, Any]:
    """A first run's report for --agree-with; ValueError says what is wrong with it."""
    try:
        first = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give the .json a scale-out run wrote") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a scale-out report ({exc})") from None
    rows = first.get("rows") if isinstance(first, dict) else None
    if not rows or any("efficiency_median" not in row for row in rows):
        raise ValueError(f"{path}: not a scale-out report (no rows of E(N) medians)")
    return dict(first)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, pairs, x1 = report["rows"], report["pairs"], report["x1_rps"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    for pair in pairs:
        color = "tab:blue" if pair["order"][0] == 1 else "tab:purple"
        ax1.plot(pair["k"], pair["efficiency"], "o", color=color, alpha=0.6)
    for row in rows[1:]:
        if row["efficiency_interval"]:
            lo, hi = row["efficiency_interval"]
            mean = row["efficiency_mean"]
            ax1.errorbar(
                row["n"] + 0.15, mean, yerr=[[mean - lo], [hi - mean]], fmt="s", color="black",
                capsize=4,
            )  # fmt: skip
        if row["efficiency_median"] is not None:  # None: no pair of this N yet
            ax1.plot(row["n"], row["efficiency_median"], "_", color="tab:red", markersize=22)
    ax1.axhline(1.0, color="gray", linestyle="--")
    ax1.axhline(0.95, color="tab:red", linestyle=":")
    ax1.set(
        xlabel="nodes N",
        ylabel="E(N) within each pair",
        title="E(N) per pair (blue: N=1 first), median, 95% t-interval",
        xticks=[r["n"] for r in rows],
        xticklabels=[str(r["n"]) for r in rows],
    )
    ns = [r["n"] for r in rows]
    for pair in pairs:
        ax2.plot(pair["k"], x1 * pair["k"] * pair["efficiency"], "o", color="tab:blue", alpha=0.5)
    ax2.plot(1, x1, "o", color="tab:blue")
    grid = np.linspace(1, max(ns), 100)
    ax2.plot(grid, grid * x1, "--", color="gray", label="ideal N·X(1)")
    fit = report.get("usl") or {}
    if "sigma" in fit:
        ax2.plot(
            grid,
            usl(grid, fit["lambda"], fit["sigma"], fit["kappa"]),
            color="tab:orange",
            label=f"USL on N={fit['fit_ns']}: σ={fit['sigma']:.4f} κ={fit['kappa']:.5f}",
        )
        if fit.get("check"):
            check = fit["check"]
            lo, hi = check["predicted_interval"]
            ax2.errorbar(
                check["n"] + 0.2, check["predicted_rps"],
                # The band comes from draws clipped at sigma, kappa >= 0: an
                # estimate on that bound can sit at the band's edge (or just past it).
                yerr=[
                    [max(0.0, check["predicted_rps"] - lo)],
                    [max(0.0, hi - check["predicted_rps"])],
                ],
                fmt="D", color="tab:orange", capsize=4, label=f"predicted X({check['n']})",
            )  # fmt: skip
    ax2.set(xlabel="nodes N", ylabel="X(1) · N · E(N)  req/s", title="Capacity (drift removed)")
    ax2.legend(fontsize=8)
    for pair in pairs:
        for run in pair["runs"]:
            if run.get("requests_per_cpu_s") is not None:
                ax3.plot(run["n"], run["requests_per_cpu_s"], "o", color="tab:green", alpha=0.5)
    medians = [
        (r["n"], r["requests_per_cpu_s_median"]) for r in rows if r["requests_per_cpu_s_median"]
    ]
    if medians:
        ax3.plot(*zip(*medians, strict=True), "_-", color="black", markersize=22)
    ax3.set(xlabel="nodes N", ylabel="requests per node CPU-second", title="Work per CPU-second")
    verdict = "valid run" if report["valid"] else "NOT valid (see report)"
    fig.suptitle(
        f"cattle scale-out, {report['plan']['cpu']} core per node, {report['plan']['mix']} mix — "
        f"{verdict} — {reports.when(report)}, {report['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _design_text(plan: dict[str, Any]) -> str:
    """How the report's pairs were measured, for its markdown (older reports: alternating)."""
    if plan.get("design", "alternating") == "side-by-side":
        pinned = (
            "Every node of every lab runs on the machine's last core, the databases, "
            "HAProxy and locust on the other: the host slows one core at a time, and every "
            "fleet then shares it. "
            if plan.get("pin")
            else "The nodes are not pinned to a core. "
        )
        references = plan.get("references", 1)
        ones = (
            "a fleet of one"
            if references == 1
            else f"{references} fleets of one (X(1) is their mean)"
        )
        fleet_nodes = plan.get("fleet_nodes", 0)
        ks = (
            "a fleet of k nodes"
            if not fleet_nodes
            else f"{fleet_nodes}/k fleets of k nodes (at least one; X(k) is their mean, so "
            f"every block runs {fleet_nodes} or more nodes on the k side)"
        )
        return (
            "\n\nThe machine drifts, so every N is compared with N=1 **at the same time**: a "
            f"block starts labs side by side, {ks} and {ones}, each "
            f"with its own HAProxy and database, and loads them ({plan['users_per_node']} users "
            f"per node) at once. After {plan['warmup_s']:g} s of "
            f"warm-up it counts {plan.get('block_pairs', 1)} windows of {plan['measure_s']:g} s, "
            "the same seconds for every load; each window is a pair. " + _start_text(plan) + pinned
        )
    return (
        " Nodes out of rotation "
        + (
            "**burn their CPU cap** (a spinning process in their cgroup), so the machine is as "
            "busy while one node serves as while k do."
            if plan.get("burn_idle")
            else "**idle** (the control: the machine is less busy while one node serves)."
        )
        + "\n\nThe machine drifts, so every N is compared with N=1 **within a pair** of "
        "segments seconds apart in one lab under one load. A block starts a lab of k nodes and "
        f"{plan['users_per_node']}·k users in k equal shares of the mix (only the shares of "
        f"the serving nodes send), warms up {plan['warmup_s']:g} s, then serves "
        f"{plan.get('block_pairs', 1)} pairs of segments: N=1 (one node of the k, the next at "
        "every pair, the others in HAProxy's MAINT) and N=k, N=1 first in odd pairs and last "
        f"in even ones. A segment settles {plan.get('settle_s', 0):g} s after the switch, then "
        f"counts {plan['measure_s']:g} s. "
    )


def _start_text(plan: dict[str, Any]) -> str:
    start = plan.get("start") or ("alternate" if plan.get("alternate_start") else "")
    if start == "alternate":
        return (
            "The labs come up, and their loads start, in an order that alternates from "
            "one block of k to the next: the fleets of k first, then the fleets of one first. "
        )
    if start == "balanced":
        return (
            "The labs come up, and their loads start, in a **balanced order**: the places "
            "in it are taken in mirror pairs (first and last, second and second to last, "
            "...), every other pair by the fleets of k, from the outermost pair in a k's "
            "even blocks and from the next in its odd ones (a single fleet of k takes the "
            "middle place), so both sides have the same mean place in every block. "
        )
    return ""


def _bus_text(plan: dict[str, Any]) -> str:
    if not plan.get("bus", True):
        return "**off (the control)**."
    if "bus_timers" not in plan:  # reports from before the choice: as shipped
        return "**on**."
    if plan["bus_timers"] == "shipped" or plan["cpu"] >= 1:
        return "**on**, its timers **as shipped** (the control)."
    stretched = bus_timers(Plan(cpu=plan["cpu"]))
    return (
        f"**on**, its timers **on the model's clock**: 1/{plan['cpu']:g} times the shipped "
        "ones, as a node of one core slowed as much (heartbeats every "
        f"{stretched['bus_heartbeat_interval_s']:g} s, a peer suspect after "
        f"{stretched['bus_suspect_after_s']:g} s, dead after "
        f"{stretched['bus_dead_after_s']:g} s), so each node hears a peer as often per "
        "request it serves as a node of one core does."
    )


def markdown(report: dict[str, Any], png: str = "scaleout.png") -> str:
    plan, fit = report["plan"], report.get("usl") or {}
    side_by_side = plan.get("design") == "side-by-side"  # pairs in no order
    lines = [
        "# Scale-out: throughput against the number of nodes",
        "",
        f"{reports.measured(report)} Reproduce with `{report['command']}`.",
        "",
        f"Each node is capped at **{plan['cpu']} core** (cgroup v1 `cpu`, over CFS periods of "
        f"{plan.get('cpu_period_ms', 100):g} ms), behind HAProxy, "
        f"on the {plan['backend']} backend; locust drives the **{plan['mix']}** mix with "
        f"{plan['users_per_node']} closed-loop users per node of k. The nodes' read "
        f"cache is **{'on' if plan.get('cache', True) else 'off'}**; its hit ratio is over "
        "the whole run, warm-up included, summed over the nodes (/metrics). The node bus is "
        + _bus_text(plan)
        + _design_text(plan)
        + f"E(N) = X(N) / (N·X(1)) is taken in each pair; blocks repeat (at least "
        f"{plan['min_pairs']}, at most {plan['max_pairs']} pairs per N, no new block after "
        f"{plan['max_minutes']:g} min) until the interval is at most {plan['ci_width']} wide. "
        f"Stopped: {report['stopped']}. Interval: {report['interval']}.",
        "",
        f"**Verdict: {'valid' if report['valid'] else 'NOT valid'}.**"
        + ("" if report["valid"] else " Problems: " + "; ".join(report["problems"])),
        "",
        "| N | pairs (N=1: runs) | E(N) median | interval | width | spread "
        "| E(N) by order (N=1 first / last) | X(N) median req/s | req per node CPU-s "
        "| cache hit ratio | p50 ms | p99 ms | load generator cores "
        "| machine busy |",
        "|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        interval = (
            f"{r['efficiency_interval'][0]:.3f} – {r['efficiency_interval'][1]:.3f}"
            if r["efficiency_interval"]
            else "–"
        )
        orders = (
            " / ".join(_f(v, ".3f") for v in r["efficiency_by_order"].values())
            if r["efficiency_by_order"] and not side_by_side
            else "–"
        )
        lines.append(
            f"| {r['n']} | {r['pairs'] or len(r['throughput_runs'])} | "
            f"{_f(r['efficiency_median'], '.3f')} | {interval} | "
            f"{_f(r['interval_width'], '.3f')} | "
            f"{_f(r['spread'], '.0%')} | {orders} | {_f(r['throughput_median'], '.0f')} | "
            f"{_f(r['requests_per_cpu_s_median'], '.0f')} | "
            f"{_f(r.get('cache_hit_ratio_median'), '.1%')} | {_f(r['p50_ms'], '.1f')} | "
            f"{_f(r['p99_ms'], '.1f')} | {_f(r['loadgen_cpu_cores'], '.2f')} | "
            f"{_f(r['machine_busy'], '.0%')} |"
        )
    by_block = [r for r in report["rows"] if r.get("block_means")]
    if by_block:
        lines += [
            "",
            "Mean E of each block, in the order they ran (the interval is over these): "
            + "; ".join(
                f"N={r['n']}: " + ", ".join(f"{e:.3f}" for e in r["block_means"]) for r in by_block
            )
            + ".",
        ]
    compared = report.get("agreement")
    if compared:
        lines += [
            "",
            f"Against the first run in `{compared['with']}` (measured "
            f"{compared['first_measured'] or 'at an unrecorded time'}): the runs agree on "
            f"E(N) where the medians are at most {compared['bound']:g} apart.",
            "",
            "| N | E(N) median, this run | first run | difference | agree |",
            "|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['n']} | {_f(r['median'], '.3f')} | {_f(r['first_median'], '.3f')} | "
            f"{_f(r['difference'], '+.3f')} | {'yes' if r['agree'] else '**no**'} |"
            for r in compared["rows"]
        ]
    lines += [
        "",
        f"X(1) over the whole run: median {report['x1_rps']:.0f} req/s, its runs spread "
        f"{_f(report['x1_spread'], '.0%')} (max - min over median): the drift the pairs "
        "keep out of E(N). Requests per node CPU-second: the serving nodes' cgroups, over "
        "the measured window; the per-CPU ratio of a pair moves with the machine as E does "
        "when every node gets its whole cap.",
        "",
    ]
    if "sigma" in fit:
        lines += [
            f"## Universal Scalability Law, fitted on N = {fit['fit_ns']} only",
            "",
            "Fitted on the pairs' capacities relative to their own N=1 run (N·E(N)), "
            "X(N) = X(1)·N / (1 + σ(N−1) + κN(N−1)) with X(1) the run's median:",
            "",
            f"- X(1) = {fit['lambda']:.1f} ± {fit['lambda_stderr']:.1f} req/s (standard error)",
            f"- σ (contention) = {fit['sigma']:.4f} ± {_f(fit['sigma_stderr'], '.4f')}",
            f"- κ (coherency) = {fit['kappa']:.5f} ± {_f(fit['kappa_stderr'], '.5f')}",
            "- adding nodes stops paying past N* = "
            + (f"{fit['peak_n']:.0f}" if fit["peak_n"] else "none (κ ≈ 0)"),
            "",
        ]
        check = fit.get("check")
        if check:
            lo, hi = check["predicted_interval"]
            lines += [
                f"Predicted X({check['n']}) = {check['predicted_rps']:.0f} req/s "
                f"(95% band over σ, κ: {lo:.0f} – {hi:.0f}); measured in this run "
                f"X(1)·{check['n']}·E({check['n']}) = {check['measured_rps']:.0f} req/s "
                f"(raw median of the N={check['n']} runs "
                f"{_f(check['measured_raw_median_rps'], '.0f')}): "
                f"the prediction is off by **{check['relative_error']:+.1%}**. "
                f"Past N={check['n']} the fit is an extrapolation: read what "
                "`python -m loadtests.capacity` says there with at least this error.",
                "",
            ]
    elif fit:
        lines += [f"No USL fit: {fit['error']}.", ""]
    lines += [
        f"![scale-out]({png})",
        "",
        "Validity: each run's nodes must be the bottleneck (every node throttled in at least "
        f"{NODE_MIN_THROTTLED:.0%} of CFS periods and using at least {NODE_MIN_SHARE:.0%} "
        f"of its cap; the load generator under {LOADGEN_MAX_CORES} core; the machine under "
        f"{MACHINE_MAX_BUSY:.0%} busy; at most {MAX_ERROR_RATE:.0%} failed requests), every N "
        f"needs at least {plan['min_pairs']} pairs"
        + ("" if side_by_side else " in both orders")
        + ", and the 95% interval of "
        f"every E(N) over its blocks (at least two) may be at most {plan['ci_width']:g} wide: "
        "wider, the repeats disagree "
        "(the spread column, max - min over median, is shown but not judged: it grows with "
        "the number of pairs).",
        "",
    ]
    return "\n".join(lines)


MEASURES = {"side-by-side": measure_side_by_side, "alternating": measure_block}


def run(
    plan: Plan,
    command: str,
    measure: MeasureBlock | None = None,
    refresh: Callable[[dict[str, Any]], None] | None = None,
    first: tuple[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The pairs of the plan; the report (written by the caller). With
    `refresh`, a report of the pairs so far after every pair, marked in
    progress; with `first` (its path and report), the agreement with it."""
    base = Path(tempfile.mkdtemp(prefix="cattle-scaleout-", dir="/tmp"))
    base.chmod(0o755)

    def report_of(pairs: list[dict[str, Any]], stopped: str) -> dict[str, Any]:
        report = summarize(pairs, plan, stopped)
        if first is not None:
            report = agreement(report, first[1], first[0])
        return reports.stamped(command, report)

    def on_pair(pairs: list[dict[str, Any]]) -> None:
        if refresh is not None:
            refresh(report_of(list(pairs), IN_PROGRESS))

    designed = MEASURES[plan.design]
    try:
        pairs, stopped = run_pairs(
            plan,
            measure or (lambda k, orders, first, d: designed(k, orders, first, plan, d)),
            base,
            on_pair=on_pair,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return report_of(pairs, stopped)


def _ns(text: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give node counts like 1,2,4,8") from None
    if not ns or ns[0] != 1 or any(n < 1 for n in ns) or len(set(ns)) != len(ns):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct counts, 1 first, e.g. 1,8")
    return ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.experiments.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="a short run of the code path")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="writes OUT.json, OUT.md and OUT.png"
    )
    parser.add_argument("--cpu", type=float, help="cap per node (fraction of a core)")
    parser.add_argument(
        "--cpu-period-ms", type=float, help="the CFS period the cap is enforced over (default 20)"
    )
    parser.add_argument(
        "--design",
        choices=tuple(MEASURES),
        help="a fleet of one beside the fleet of k (default), or one lab serving 1 and k in turn",
    )
    parser.add_argument(
        "--pin",
        choices=("on", "off"),
        help="every node on the last core, everything else on the others (default on)",
    )
    parser.add_argument(
        "--references",
        type=int,
        help="side by side: fleets of one beside the fleet of k, X(1) their mean (default 4)",
    )
    parser.add_argument(
        "--fleet-nodes",
        type=int,
        help="side by side: fleets of k repeated to hold this many nodes, X(k) their mean "
        "(default: the largest N; 0: one fleet of k)",
    )
    parser.add_argument(
        "--block-pairs",
        type=int,
        help="pairs per block, one block one set of labs; the interval is over blocks (default 4)",
    )
    parser.add_argument(
        "--users-per-node", type=int, help="closed-loop users per serving node (default 10)"
    )
    parser.add_argument("--min-pairs", type=int, help="pairs per N before the interval may stop it")
    parser.add_argument("--max-pairs", type=int, help="pairs per N at most")
    parser.add_argument("--max-minutes", type=float, help="no new pair after this long")
    parser.add_argument(
        "--ns", type=_ns, help="node counts, comma-separated, 1 first (default 1,2,4,8)"
    )
    parser.add_argument("--mix", choices=MIX_NAMES, help="the locust mix")
    parser.add_argument(
        "--cache", choices=("on", "off"), help="the nodes' read cache (default off)"
    )
    parser.add_argument(
        "--bus",
        choices=("on", "off"),
        help="the node bus in every lab (default on; off is the control: E(N) without it)",
    )
    parser.add_argument(
        "--start",
        choices=("balanced", "alternate", "fleets-first"),
        help="the order a block's labs come up in (side by side; default balanced)",
    )
    parser.add_argument(
        "--bus-timers",
        choices=("model", "shipped"),
        help="the bus's heartbeat and failure bounds: 1/cpu times the shipped ones "
        "(default model), or as shipped (the control)",
    )
    parser.add_argument(
        "--burn-idle",
        choices=("on", "off"),
        help="nodes out of rotation burn their CPU cap (default on; off is the control)",
    )
    parser.add_argument(
        "--agree-with",
        type=Path,
        metavar="FIRST.json",
        help="a first run's report: state per N whether this run agrees with it",
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT.md and OUT.png from OUT.json"
    )
    parser.add_argument(
        "--refresh-plot",
        action="store_true",
        help="rewrite OUT.md and OUT.png after every pair (a report marked in progress)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    changes = {
        "cpu": args.cpu,
        "cpu_period_ms": args.cpu_period_ms,
        "users_per_node": args.users_per_node,
        "references": args.references,
        "fleet_nodes": args.fleet_nodes,
        "design": args.design,
        "pin": None if args.pin is None else args.pin == "on",
        "block_pairs": args.block_pairs,
        "min_pairs": args.min_pairs,
        "max_pairs": args.max_pairs,
        "max_minutes": args.max_minutes,
        "ns": args.ns,
        "cache": None if args.cache is None else args.cache == "on",
        "bus": None if args.bus is None else args.bus == "on",
        "bus_timers": args.bus_timers,
        "start": args.start,
        "mix": args.mix,
        "burn_idle": None if args.burn_idle is None else args.burn_idle == "on",
    }
    plan = Plan(**(asdict(plan) | {k: v for k, v in changes.items() if v is not None}))
    if plan.design != "side-by-side" and args.references is None:
        plan = replace(plan, references=1)  # one lab serves N=1 and N=k in turn
    if plan.design != "side-by-side" and args.fleet_nodes is None:
        plan = replace(plan, fleet_nodes=0)  # one lab of k serves N=1 and N=k in turn
    nodes = fleet_nodes(plan)
    plan = replace(plan, fleet_nodes=nodes)  # the report records what ran
    stretched = bus_timers(plan)
    try:  # the nodes' own settings judge the stretched timers, as they will at start
        Settings.model_validate({"node_id": "scaleout", **stretched})
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0])
        parser.error(
            f"--cpu {plan.cpu:g} stretches {env_var(name)} to {stretched[name]:g} s, which a "
            f"node refuses ({exc.errors()[0]['msg']}): use --bus-timers shipped, or a larger --cpu"
        )
    if plan.block_pairs < 1:
        parser.error("--block-pairs must be at least 1")
    if plan.min_pairs < 2 or plan.max_pairs < plan.min_pairs:
        parser.error("--min-pairs must be at least 2 and --max-pairs at least --min-pairs")
    if plan.references < 1 or (plan.references > 1 and plan.design != "side-by-side"):
        parser.error("--references must be at least 1, and more than 1 only side by side")
    if nodes < 0 or (nodes and plan.design != "side-by-side"):
        parser.error("--fleet-nodes must be at least 0, and more than 0 only side by side")
    first = None
    if args.agree_with is not None and not args.render:
        try:
            first = (str(args.agree_with), load_first(args.agree_with))
        except ValueError as exc:
            parser.error(f"--agree-with {exc}")
    command = reports.command_line(__spec__.name, argv)

    def refresh(partial: dict[str, Any]) -> None:
        # OUT.md and OUT.png only: OUT.json is written once, when the run is done.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        reports.draw(partial, args.out, lambda r: markdown(r, png=args.out.name + ".png"), plot)

    report = reports.main(
        "scaleout",
        args.out,
        render_only=args.render,
        measure=lambda: run(
            plan, command, refresh=refresh if args.refresh_plot else None, first=first
        ),
        markdown=lambda report: markdown(report, png=args.out.name + ".png"),
        plot=plot,
        lock=not args.smoke,  # a smoke run checks the code, not the machine
    )
    if report is None:
        return 0
    for row in report["rows"]:
        print(
            f"N={row['n']}: E median {_f(row['efficiency_median'], '.3f')}, interval "
            f"{row['efficiency_interval'] or '–'}, "
            f"X median {_f(row['throughput_median'], '.0f')} req/s"
        )
    print(f"{'valid' if report['valid'] else 'NOT valid'}; report in {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
