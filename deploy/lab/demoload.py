"""The demo's steady load: locust users at a fixed rate, their counts in a file every second.

Run by `python -m deploy.lab.demo` as a child process of its own (gevent's
monkey-patching stays out of the demo), for a bounded time. Every second it
rewrites `--out` (the lab's load.json) with what the room must see: requests
sent, requests failed, the current rate; the live view shows that line. A
SIGTERM stops the users (each finishes the request it has in flight) and
writes the final counts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any


def _write(path: Path, counts: dict[str, Any]) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(counts))
    partial.replace(path)  # the view never reads half a file


def run(host: str, *, users: int, rate_per_user: float, duration_s: float, out: Path) -> int:
    import gevent
    from gevent.event import Event
    from locust import User, constant_throughput, events
    from locust.env import Environment

    from loadtests.clients import notes
    from loadtests.harness.locust_run import user_counts

    weights = notes.MIXES["read-mostly"]
    counts = user_counts(weights, users)
    classes: list[type[User]] = []
    for user_class, weight in weights.items():
        user_class.weight = weight
        user_class.fixed_count = counts[user_class]
        # A fixed rate per user: the load stays the same whatever the fleet does.
        user_class.wait_time = constant_throughput(rate_per_user)
        classes.append(user_class)
    notes.seed(host, 50)  # readers have notes to read from the first second

    env = Environment(user_classes=classes, events=events, host=host, stop_timeout=10)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)  # type: ignore[no-untyped-call]
    stopping = Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)

    def snapshot(state: str) -> dict[str, Any]:
        total = env.stats.total
        return {
            "pid": os.getpid(),
            "host": host,
            "users": users,
            "rate_per_user": rate_per_user,
            "state": state,
            "requests": total.num_requests,
            "failures": total.num_failures,
            "rps": round(total.current_rps, 1),
            "errors": {str(k): v.occurrences for k, v in list(env.stats.errors.items())[:5]},
            "updated": time.time(),
        }

    runner.start(users, spawn_rate=users)
    deadline = time.monotonic() + duration_s
    while not stopping.is_set() and time.monotonic() < deadline:
        _write(out, snapshot("running"))
        stopping.wait(1.0)
    runner.stop()
    runner.quit()
    _write(out, snapshot("stopped"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab.demoload", description=__doc__)
    parser.add_argument("--host", required=True, help="the lab's front URL")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rate-per-user", type=float, default=4.0, help="requests/s per user")
    parser.add_argument("--duration-s", type=float, default=3600)
    parser.add_argument("--out", type=Path, required=True, help="the counts file (load.json)")
    args = parser.parse_args(argv)
    if not 0 < args.duration_s <= 4 * 3600:
        parser.error("--duration-s must be between 0 and 4 hours")
    return run(
        args.host,
        users=args.users,
        rate_per_user=args.rate_per_user,
        duration_s=args.duration_s,
        out=args.out,
    )


if __name__ == "__main__":
    raise SystemExit(main())
