"""A live terminal view of the lab: each node's state, load and HAProxy's view."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from typing import Any

from deploy.lab.cluster import Lab

REQUESTS_COUNTER = "http_server_request_duration_seconds_count"


def requests_served(metrics_url: str) -> float | None:
    """Total requests a node has answered, from its Prometheus text."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=1.0) as response:  # noqa: S310 (loopback)
            text = response.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(REQUESTS_COUNTER):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _check(health: dict[str, Any] | None, name: str) -> str:
    for check in (health or {}).get("checks", {}).get(name, []) or []:
        value = check.get("observedValue")
        if value is not None:
            return str(value)
    return "-"


def render(state: dict[str, Any], rates: dict[str, float | None]) -> str:
    lines = [
        f"cattle lab {state['run_dir']}  front={state['front']}  "
        f"backend={state['options']['backend']}  {time.strftime('%H:%M:%S')}",
        "",
        f"{'node':6} {'state':10} {'in-flight':>9} {'req/s':>8}  "
        f"{'haproxy':14} {'weight':>6}  agent",
    ]
    for node in state["nodes"]:
        health = node.get("health")
        lifecycle = (health or {}).get("lifecycle", "down" if not node["running"] else "?")
        proxy = node.get("haproxy") or {}
        rate = rates.get(node["id"])
        lines.append(
            f"{node['id']:6} {lifecycle!s:10} {_check(health, 'http:inFlight'):>9} "
            f"{'-' if rate is None else f'{rate:.0f}':>8}  {proxy.get('status') or '-':14} "
            f"{proxy.get('weight') or '-':>6}  {proxy.get('agent') or '-'}"
        )
    return "\n".join(lines)


def watch(lab: Lab, *, interval_s: float = 1.0, count: int = 0) -> None:
    previous: dict[str, tuple[float, float]] = {}
    shown = 0
    while count == 0 or shown < count:
        state = lab.status()
        rates: dict[str, float | None] = {}
        now = time.monotonic()
        for node in state["nodes"]:
            served = requests_served(node["url"] + "/metrics") if node["running"] else None
            before = previous.get(node["id"])
            if served is not None and before is not None and now > before[0]:
                rates[node["id"]] = max(0.0, served - before[1]) / (now - before[0])
            if served is not None:
                previous[node["id"]] = (now, served)
        # Clear the screen and redraw: a plain ANSI terminal is all this needs.
        print("\x1b[2J\x1b[H" + render(state, rates), flush=True)
        shown += 1
        if count == 0 or shown < count:
            time.sleep(interval_s)
