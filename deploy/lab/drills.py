"""Drills on a running lab: each does one thing, says what it did and what to watch for.

A drill is one of the lab's verbs (drain, kill, restart, scale, kill-primary)
run from a second terminal while the room watches the live view. Each drill
appends `issued` and then `done` (or `failed`) to the run directory's event
log (events.jsonl); the live view reads that log and times how long each
drill took to show: the node seen draining, out of HAProxy's rotation, gone.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.lab.cluster import Lab

EVENTS_FILE = "events.jsonl"


def record(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event; a single short write, so concurrent writers never interleave."""
    line = json.dumps({"t": time.time(), **event}) + "\n"
    fd = os.open(run_dir / EVENTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(run_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended since byte `offset`, and the offset to read from next time."""
    try:
        with (run_dir / EVENTS_FILE).open("rb") as log:
            log.seek(offset)
            data = log.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
    events = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return events, offset + len(complete)


@dataclass(frozen=True)
class Drill:
    does: str
    watch_for: str


DRILLS = {
    "drain": Drill(
        "SIGTERM: the node fails its readiness check, waits its drain delay while "
        "in-flight requests finish, then exits",
        "its row turns draining, the front takes it out (HAProxy DRAIN/DOWN, or its "
        "anycast route withdrawn), then it is gone; "
        "the other nodes' req/s rise and the load's failures stay at 0",
    ),
    "kill": Drill(
        "SIGKILL: the node dies without a goodbye",
        "the front takes it out (HAProxy on the first refused connection, re-sending "
        "what it had; anycast: its sidecar withdraws the route); its row turns lost",
    ),
    "restart": Drill(
        "starts the node again with the same id and ports",
        "its row goes starting -> ready, the front takes it back (HAProxy UP after "
        "two checks, or its route announced), and its req/s climbs back to its share",
    ),
    "scale": Drill(
        "grows or shrinks the fleet live: new nodes join HAProxy and Prometheus once "
        "ready; leaving nodes are drained first",
        "rows appear (starting -> ready) or drain away; the per-node req/s spread "
        "over the new count; Prometheus's graph gains or ends a line",
    ),
    "kill-primary": Drill(
        "SIGKILL of the database primary's PostgreSQL; Patroni promotes a replica",
        "requests that reach the database are answered 503 until Patroni has promoted "
        "a new leader (the demo's clients never retry, so its load counts them as "
        "failed); the event log shows the time to the new leader",
    ),
}


def run(lab: Lab, verb: str, target: str | None, action: Callable[[], str]) -> str:
    """Run `action` as drill `verb` on `target`: log it, print what it did and what to watch."""
    drill = DRILLS[verb]
    event_id = secrets.token_hex(4)
    subject = f"{verb} {target}" if target else verb
    print(f"{subject}: {drill.does}")
    print(f"  watch for: {drill.watch_for}", flush=True)
    record(lab.run_dir, {"id": event_id, "verb": verb, "target": target, "phase": "issued"})
    started = time.monotonic()
    try:
        outcome = action()
    except BaseException as exc:
        record(
            lab.run_dir,
            {"id": event_id, "verb": verb, "target": target, "phase": "failed",
             "detail": str(exc)[:200]},
        )  # fmt: skip
        raise
    took_s = time.monotonic() - started
    record(
        lab.run_dir,
        {"id": event_id, "verb": verb, "target": target, "phase": "done", "detail": outcome,
         "took_s": round(took_s, 2)},
    )  # fmt: skip
    print(f"  done in {took_s:.1f} s: {outcome}")
    return outcome
