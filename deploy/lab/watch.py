"""A live terminal view of the lab, read from the nodes' bus heartbeats.

`watch` is a SUB-only client of the node bus: it connects to every node's
bus endpoint (lab.json), subscribes to `hb` and `bye`, binds nothing and
sends nothing, so a fleet of any size costs it one socket and the nodes
nothing extra. Each row is what that node last said about itself (state,
in-flight, requests per second, loop lag, cache) and how long ago; HAProxy's
column comes from its admin socket. It does not subscribe to `inv`, so it
has no use for sequence gaps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from deploy.lab import haproxy, procs
from deploy.lab.cluster import Lab
from service.bus import messages


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

    def __post_init__(self) -> None:
        self._context = zmq.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 10_000)
        self._sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        for topic in (messages.HB, messages.BYE):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        for endpoint in self.endpoints:
            self._sub.connect(endpoint)

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
        seen = self.nodes.get(node)
        if seen is None:
            return None
        if seen.left:
            return "left"
        value = seen.status.get("state")
        return value if isinstance(value, str) else "?"

    def close(self) -> None:
        self._sub.close()
        self._context.term()


def _cell(value: object, width: int) -> str:
    return f"{'-' if value is None else value!s:>{width}}"


def render(state: dict[str, Any], view: FleetView, proxy: Mapping[str, Mapping[str, str]]) -> str:
    now = time.monotonic()
    lines = [
        f"cattle lab {state['run_dir']}  front={state['front']}  "
        f"backend={state['options']['backend']}  {time.strftime('%H:%M:%S')}",
        "",
        f"{'node':6} {'state':10} {'heard':>6} {'in-flight':>9} {'req/s':>8} {'lag ms':>7} "
        f"{'cache':>11}  {'haproxy':14} {'weight':>6}  agent",
    ]
    for node in state["nodes"]:
        seen = view.nodes.get(node["id"])
        status = seen.status if seen else {}
        cache = status.get("cache") or {}
        hits, misses = cache.get("hits"), cache.get("misses")
        ratio = f"{hits / (hits + misses):.0%}" if hits is not None and misses else "-"
        row = proxy.get(node["id"], {})
        lines.append(
            f"{node['id']:6} {view.state_of(node['id']) or 'unheard':10} "
            f"{_cell(None if seen is None else f'{now - seen.heard_at:.1f}s', 6)} "
            f"{_cell(status.get('in_flight'), 9)} {_cell(status.get('rps'), 8)} "
            f"{_cell(status.get('loop_lag_ms'), 7)} {ratio:>11}  "
            f"{row.get('status') or '-':14} {row.get('weight') or '-':>6}  "
            f"{row.get('agent_status') or '-'}"
        )
    return "\n".join(lines)


def watch(lab: Lab, *, interval_s: float = 1.0, count: int = 0) -> None:
    state = lab.load()
    endpoints = [node["bus"] for node in state["nodes"] if node.get("bus")]
    view = FleetView(endpoints)
    shown = 0
    try:
        while count == 0 or shown < count:
            view.poll(interval_s if shown else min(interval_s, 1.5))
            proxy_view: dict[str, dict[str, str]] = {}
            front = state.get("haproxy")
            if front and procs.is_ours(front["pid"], front["config"]):
                with contextlib.suppress(OSError):
                    proxy_view = haproxy.server_states(Path(front["socket"]))
            # Clear the screen and redraw: a plain ANSI terminal is all this needs.
            print("\x1b[2J\x1b[H" + render(state, view, proxy_view), flush=True)
            shown += 1
    finally:
        view.close()
