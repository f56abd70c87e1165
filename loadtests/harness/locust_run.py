"""Run the locust users as a library, in this process, and write every request.

Experiments start this as a child process (`python -m loadtests.harness.locust_run`),
so gevent's monkey-patching stays out of theirs and its CPU use can be
measured on its own: a load generator that ran out of CPU makes a run invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def user_counts(weights: dict[Any, int], users: int) -> dict[Any, int]:
    """Split `users` by weight, every class with a weight getting at least one."""
    if users < len(weights):
        raise ValueError(f"{users} users cannot cover the {len(weights)} kinds of user in the mix")
    total = sum(weights.values())
    counts = {cls: max(1, round(users * weight / total)) for cls, weight in weights.items()}
    largest = max(weights, key=lambda cls: weights[cls])
    counts[largest] += users - sum(counts.values())  # the rounding lands on the biggest class
    return counts


def run(
    host: str,
    *,
    users: int,
    duration_s: float,
    mix: str = "read-mostly",
    spawn_rate: float = 1000,
    seed_notes: int = 200,
    rate_per_user: float | None = None,
    started_file: Path | None = None,
) -> dict[str, Any]:
    import gevent
    from locust import User, constant_throughput, events
    from locust.env import Environment

    from loadtests.clients import notes

    weights = notes.MIXES[mix]
    counts = user_counts(weights, users)
    classes: list[type[User]] = []
    for user_class, weight in weights.items():
        user_class.weight = weight
        # Fixed counts: locust's weighted rounding gives a small run no writer at all.
        user_class.fixed_count = counts[user_class]
        if rate_per_user is not None:
            # Open-ish loop: each user aims at a fixed rate, so the offered load
            # is users x rate whatever the latency (for runs below saturation).
            user_class.wait_time = constant_throughput(rate_per_user)
        classes.append(user_class)
    notes.seed(host, seed_notes)

    # stop_timeout: at the end every user finishes the request it has in
    # flight, so each create the service stored was also seen by the client
    # (else the audit would count it as unexpected).
    env = Environment(user_classes=classes, events=events, host=host, stop_timeout=15)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)  # type: ignore[no-untyped-call]
    started = time.time()
    if started_file is not None:
        started_file.write_text(str(started))  # the caller's clock for its event schedule
    runner.start(users, spawn_rate=spawn_rate)
    gevent.sleep(duration_s)
    runner.stop()
    runner.quit()
    ended = time.time()
    recorder = notes.RECORDER
    return {
        "host": host,
        "users": users,
        "mix": mix,
        "rate_per_user": rate_per_user,
        "started": started,
        "ended": ended,
        "prefix": recorder.prefix,
        "columns": list(recorder.COLUMNS),
        "rows": recorder.rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.harness.locust_run", description=__doc__
    )
    parser.add_argument("--host", required=True, help="e.g. the lab's front URL")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument(
        "--mix", default="read-mostly", choices=["read-mostly", "read-only", "write-heavy"]
    )
    parser.add_argument("--seed-notes", type=int, default=200)
    parser.add_argument(
        "--rate-per-user", type=float, help="requests/s per user (default: closed loop)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every request")
    parser.add_argument("--started-file", type=Path, help="written when the load starts")
    args = parser.parse_args(argv)
    if not 0 < args.duration_s <= 3600:
        parser.error("--duration-s must be between 0 and 3600")
    result = run(
        args.host,
        users=args.users,
        duration_s=args.duration_s,
        mix=args.mix,
        seed_notes=args.seed_notes,
        rate_per_user=args.rate_per_user,
        started_file=args.started_file,
    )
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
