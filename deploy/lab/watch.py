"""A live terminal view of the lab, read from the nodes' bus heartbeats.

`watch` is a SUB-only client of the node bus: it connects to every node's
bus endpoint (lab.json), subscribes to `hb` and `bye`, binds nothing and
sends nothing, so a fleet of any size costs it one socket and the nodes
nothing extra. Each row is what that node last said about itself (state,
in-flight, requests per second, cache) and how long ago; the front's
columns come from HAProxy's admin socket (or, on the anycast front, from
the router: which nodes announce the VIP). Below the nodes: the demo load's
counts (load.json, when a load runs) and the event log of drills
(events.jsonl), each with the time it took to show in this view.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from deploy.lab import anycast, drills, haproxy, netns, procs
from deploy.lab.cluster import Lab
from service.bus import messages

LOAD_FILE = "load.json"
# A node not heard for this long (heartbeats come every second or so) is lost.
LOST_AFTER_S = 3.0
SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 30


@dataclass
class Seen:
    status: Mapping[str, Any]
    heard_at: float  # time.monotonic()
    epoch: int
    left: bool = False


@dataclass
class FleetView:
    """What the fleet's heartbeats say, node by node."""

    endpoints: Iterable[str]
    nodes: dict[str, Seen] = field(default_factory=dict)
    # Anycast: the node's bus is reachable only inside its namespace. The
    # socket is made there, so libzmq's I/O thread, born with it, lives there.
    netns: str | None = None

    def __post_init__(self) -> None:
        if self.netns is None:
            self._open()
        else:
            with netns.entered(self.netns):
                self._open()

    def _open(self) -> None:
        self._context = zmq.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 10_000)
        self._sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        for topic in (messages.HB, messages.BYE):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._endpoints: set[str] = set()
        self.follow(self.endpoints)

    def follow(self, endpoints: Iterable[str]) -> None:
        """Connect to endpoints not yet followed (nodes added by `scale`)."""
        for endpoint in endpoints:
            if endpoint not in self._endpoints:
                self._sub.connect(endpoint)
                self._endpoints.add(endpoint)

    def poll(self, timeout_s: float) -> None:
        """Take in every message that arrives within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = max(0, round((deadline - time.monotonic()) * 1000))
            if not self._sub.poll(left_ms):
                return
            while True:
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(frames)

    def _take(self, frames: list[bytes]) -> None:
        message = messages.decode(frames)
        if message is None:
            return
        header = message.header
        if message.topic == messages.BYE:
            seen = self.nodes.get(header.node)
            if seen is not None and seen.epoch == header.epoch:
                seen.left, seen.heard_at = True, time.monotonic()
            return
        self.nodes[header.node] = Seen(message.body, time.monotonic(), header.epoch)

    def state_of(self, node: str) -> str | None:
        """The node's lifecycle state as last heard; `gone` after its goodbye,
        `lost` when it fell silent without one (killed)."""
        seen = self.nodes.get(node)
        if seen is None:
            return None
        if seen.left:
            return "gone"
        if time.monotonic() - seen.heard_at > LOST_AFTER_S:
            return "lost"
        value = seen.status.get("state")
        return value if isinstance(value, str) else "?"

    def close(self) -> None:
        self._sub.close()
        self._context.term()


class Fleet:
    """One FleetView for loopback nodes, or one per namespace (anycast), read as one."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.loopback = FleetView([])
        self.in_netns: dict[str, FleetView] = {}
        self.follow(state)

    def follow(self, state: dict[str, Any]) -> None:
        for node in state["nodes"]:
            if not node.get("bus"):
                continue
            if node.get("netns"):
                if node["id"] not in self.in_netns:
                    self.in_netns[node["id"]] = FleetView([node["bus"]], netns=node["netns"])
            else:
                self.loopback.follow([node["bus"]])

    def poll(self, timeout_s: float) -> None:
        views = [self.loopback, *self.in_netns.values()]
        for view in views:
            view.poll(timeout_s / len(views))

    @property
    def nodes(self) -> dict[str, Seen]:
        merged = dict(self.loopback.nodes)
        for view in self.in_netns.values():
            merged.update(view.nodes)
        return merged

    def state_of(self, node: str) -> str | None:
        for view in (self.in_netns.get(node), self.loopback):
            if view is not None and node in view.nodes:
                return view.state_of(node)
        return None

    def close(self) -> None:
        for view in [self.loopback, *self.in_netns.values()]:
            view.close()


@dataclass
class Row:
    """One node as the view shows it."""

    node: str
    state: str
    front: str  # HAProxy's status of the server, or "announced"/"withdrawn"
    in_flight: object = None
    rps: float | None = None
    errors: int | None = None
    cache_ratio: float | None = None


# What each drill's effect looks like in the view, in the order it shows.
def _milestones(verb: str, row: Row | None) -> list[str]:
    if row is None:
        return ["gone"] if verb in ("drain", "scale") else []
    front_out = row.front.startswith((*haproxy.OUT_OF_ROTATION, "withdrawn"))
    shown = []
    if verb == "drain" and row.state == "draining":
        shown.append("draining")
    if verb in ("drain", "kill") and front_out:
        shown.append("out of rotation")
    if verb == "drain" and row.state == "gone":
        shown.append("gone")
    if verb == "kill" and row.state == "lost":
        shown.append("lost")
    if verb == "restart" and row.state == "ready" and row.front.startswith(("UP", "announced")):
        shown.append("back in rotation")
    return shown


@dataclass
class Event:
    id: str
    verb: str
    target: str | None
    issued_at: float  # time.time()
    shown: dict[str, float] = field(default_factory=dict)  # milestone -> seconds after issue
    done_s: float | None = None
    detail: str = ""
    failed: bool = False


@dataclass
class EventLog:
    """Drills read from events.jsonl, timed by what the view shows after each."""

    run_dir: Path
    events: list[Event] = field(default_factory=list)
    _offset: int = 0

    def read(self) -> None:
        new, self._offset = drills.read_events(self.run_dir, self._offset)
        by_id = {e.id: e for e in self.events}
        for raw in new:
            event = by_id.get(raw["id"])
            if raw["phase"] == "issued":
                event = Event(raw["id"], raw["verb"], raw.get("target"), raw["t"])
                self.events.append(event)
                by_id[event.id] = event
            elif event is not None:
                event.done_s = raw.get("took_s")
                event.detail = raw.get("detail", "")
                event.failed = raw["phase"] == "failed"

    def observe(self, rows: Mapping[str, Row]) -> None:
        now = time.time()
        for event in self.events[-10:]:
            if event.verb not in ("drain", "kill", "restart") or event.target is None:
                continue
            if event.verb == "restart" and event.done_s is None:
                continue  # the old process's "ready" is not the new one's
            for milestone in _milestones(event.verb, rows.get(event.target)):
                event.shown.setdefault(milestone, now - event.issued_at)


def spark(values: Iterable[float], top: float) -> str:
    if top <= 0:
        return ""
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


@dataclass
class Dashboard:
    """The live view's state between refreshes and its rendering."""

    lab: Lab
    state: dict[str, Any]
    view: Fleet
    log: EventLog
    history: dict[str, deque[float]] = field(default_factory=dict)
    _cache_last: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Anycast: the nodes the router's kernel spreads new flows over (its ECMP route).
    next_hops: list[str] | None = None

    def rows(self) -> dict[str, Row]:
        proxy_view: dict[str, dict[str, str]] = {}
        front = self.state.get("haproxy")
        if front and procs.is_ours(front["pid"], front["config"]):
            with contextlib.suppress(OSError):
                proxy_view = haproxy.server_states(Path(front["socket"]))
        announcing: list[str] | None = None
        plan = self.state.get("anycast")
        if plan and plan.get("bird"):
            with contextlib.suppress(anycast.AnycastError, OSError):
                announcing = anycast.announcing(plan["bird"], plan["vip"])
            self.next_hops = None
            with contextlib.suppress(netns.NetnsError, OSError):
                self.next_hops = anycast.next_hop_nodes(plan)
        rows = {}
        for node in self.state["nodes"]:
            node_id = node["id"]
            seen = self.view.nodes.get(node_id)
            status = seen.status if seen else {}
            proxy = proxy_view.get(node_id, {})
            if announcing is not None:
                front_text = "announced" if node_id in announcing else "withdrawn"
            else:
                front_text = proxy.get("status") or "-"
            errors = None
            if proxy:
                errors = sum(int(proxy.get(k) or 0) for k in ("hrsp_5xx", "eresp", "econ"))
            rps = status.get("rps") if isinstance(status.get("rps"), (int, float)) else None
            state = self.view.state_of(node_id) or "unheard"
            if state in ("gone", "lost"):
                rps = 0.0
            rows[node_id] = Row(
                node_id,
                state,
                front_text,
                status.get("in_flight") if state not in ("gone", "lost") else None,
                rps,
                errors,
                self._cache_ratio(node_id, status.get("cache") or {}),
            )
            self.history.setdefault(node_id, deque(maxlen=HISTORY)).append(float(rps or 0.0))
        return rows

    def _cache_ratio(self, node: str, cache: Mapping[str, Any]) -> float | None:
        hits, misses = cache.get("hits"), cache.get("misses")
        if not isinstance(hits, int) or not isinstance(misses, int):
            return None
        last_hits, last_misses = self._cache_last.get(node, (0, 0))
        self._cache_last[node] = (hits, misses)
        window_hits, window_misses = hits - last_hits, misses - last_misses
        if window_hits < 0 or window_misses < 0:  # a restarted node counts from 0
            window_hits, window_misses = hits, misses
        total = window_hits + window_misses
        return window_hits / total if total else None

    def refresh(self) -> dict[str, Row]:
        """Re-read lab.json (scale changes the fleet) and the event log; new rows."""
        with contextlib.suppress(Exception):
            self.state = self.lab.load()
        self.view.follow(self.state)
        self.log.read()
        rows = self.rows()
        self.log.observe(rows)
        return rows

    def render(self, rows: Mapping[str, Row]) -> RenderableType:
        state = self.state
        title = (
            f"cattle lab  front={state['options']['front']}  "
            f"backend={state['options']['backend']}  nodes={len(state['nodes'])}  "
            f"{time.strftime('%H:%M:%S')}"
        )
        table = Table(title=title, title_justify="left", expand=False)
        front_name = "announced" if state.get("anycast") else "haproxy"
        for name, justify in (
            ("node", "left"), ("state", "left"), (front_name, "left"), ("in-flight", "right"),
            ("req/s", "right"), ("last 30 s", "left"), ("errors", "right"), ("cache hits", "right"),
        ):  # fmt: skip
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        top = max((max(h) for h in self.history.values() if h), default=0.0)
        colours = {"ready": "green", "draining": "yellow", "stopping": "yellow",
                   "starting": "cyan", "gone": "dim", "lost": "red"}  # fmt: skip
        for row in rows.values():
            table.add_row(
                row.node,
                Text(row.state, style=colours.get(row.state, "")),
                row.front,
                "-" if row.in_flight is None else str(row.in_flight),
                "-" if row.rps is None else f"{row.rps:.0f}",
                spark(self.history.get(row.node, ()), top),
                "-" if row.errors is None else str(row.errors),
                "-" if row.cache_ratio is None else f"{row.cache_ratio:.0%}",
            )
        parts: list[RenderableType] = [table]
        if state.get("anycast"):
            hops = "unknown" if self.next_hops is None else ", ".join(self.next_hops) or "none"
            parts.append(Text(f"router ECMP next hops: {hops}"))
        parts.append(self._load_line())
        parts.append(self._events_table())
        return Group(*parts)

    def _load_line(self) -> Text:
        try:
            load = json.loads((self.lab.run_dir / LOAD_FILE).read_text())
        except (OSError, ValueError):
            return Text("load: none running")
        failures = int(load.get("failures", 0))
        text = Text(
            f"load: {load.get('users', '?')} users  {load.get('rps', 0):.0f} req/s  "
            f"requests {load.get('requests', 0)}  "
        )
        text.append(f"failed requests {failures}", style="bold red" if failures else "green")
        if load.get("state") and load["state"] != "running":
            text.append(f"  ({load['state']})")
        return text

    def _events_table(self) -> Table:
        table = Table(title="events", title_justify="left", show_header=True, expand=False)
        table.add_column("time")
        table.add_column("drill", no_wrap=True)
        table.add_column("seen in this view", no_wrap=True)
        table.add_column("done", overflow="ellipsis", max_width=60)
        for event in self.log.events[-8:]:
            shown = "  ".join(f"{m} +{s:.1f}s" for m, s in event.shown.items()) or "-"
            if event.failed:
                done = f"FAILED: {event.detail}"
            elif event.done_s is not None:
                done = f"{event.done_s:.1f} s  {event.detail}"
            else:
                done = "running"
            table.add_row(
                time.strftime("%H:%M:%S", time.localtime(event.issued_at)),
                f"{event.verb} {event.target or ''}".strip(),
                shown,
                done,
            )
        return table


def watch(
    lab: Lab, *, interval_s: float = 1.0, count: int = 0, console: Console | None = None
) -> None:
    """Redraw the view every `interval_s` until Ctrl+C (or `count` refreshes)."""
    state = lab.load()
    view = Fleet(state)
    dashboard = Dashboard(lab, state, view, EventLog(lab.run_dir))
    console = console or Console()
    shown = 0
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while count == 0 or shown < count:
                view.poll(interval_s if shown else min(interval_s, 1.5))
                live.update(dashboard.render(dashboard.refresh()), refresh=True)
                shown += 1
    finally:
        view.close()
