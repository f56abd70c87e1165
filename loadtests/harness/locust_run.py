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


# The mixes of loadtests/clients/notes.py (MIXES), named here so that choosing
# one does not import locust, which patches the standard library for gevent.
MIX_NAMES = ("read-mostly", "read-mostly-cycle", "read-only", "write-heavy")


class Phases:
    """When each share of the users is active: the users of 1 node, then of k, in turn.

    The users are split into `shares` equal shares, each with the same mix;
    from `at_s` seconds into the load, the first `active` shares send and the
    others wait. The scale-out experiment serves one lab with 1 node, then
    with k, on the same schedule, so that every node serving always has the
    users of one node: the same queue, the same mix, at every N.
    """

    def __init__(self, shares: int, phases: list[tuple[float, int]]) -> None:
        if shares < 1 or not phases or phases[0][0] != 0:
            raise ValueError("phases need at least one share and a first phase at 0 s")
        if any(not 0 <= active <= shares for _, active in phases):
            raise ValueError(f"a phase's active shares must be between 0 and {shares}")
        self.shares = shares
        self.phases = sorted(phases)
        self.started = time.time()  # set again when the load starts

    def active(self, share: int, at_s: float) -> bool:
        current = [active for start, active in self.phases if start <= at_s]
        return share < current[-1]

    def wait_s(self, share: int) -> float:
        """Seconds until `share` may send (0 if it may now; the rest of the day if never)."""
        at_s = time.time() - self.started
        if self.active(share, at_s):
            return 0.0
        later = [start for start, active in self.phases if start > at_s and share < active]
        return later[0] - at_s if later else 86400.0

    @classmethod
    def parse(cls, shares: int, text: str) -> Phases:
        """`0:1,23:8,38:1`: from 0 s one share, from 23 s eight, from 38 s one."""
        try:
            phases = [
                (float(at), int(active)) for at, active in (p.split(":") for p in text.split(","))
            ]
        except ValueError:
            raise ValueError(
                f"{text!r}: give phases as SECONDS:ACTIVE_SHARES,... e.g. 0:1,23:8"
            ) from None
        return cls(shares, phases)


def _gate(user_class: type[Any], phases: Phases, per_share: int) -> None:
    """Make `user_class`'s users wait while their share is not active.

    Each user takes the next index of its class when it starts; its share is
    index // per_share. It waits before its first task and after every task.
    """
    import gevent

    indices = iter(range(10**9))
    original = user_class.__dict__.get("wait_time") or getattr(user_class, "wait_time", None)
    base_start = user_class.on_start

    def on_start(self: Any) -> None:
        self.share = next(indices) // per_share
        gevent.sleep(phases.wait_s(self.share))
        base_start(self)

    def wait_time(self: Any) -> float:
        base = original(self) if original is not None else 0.0
        gevent.sleep(base)
        return phases.wait_s(self.share)

    user_class.on_start = on_start
    user_class.wait_time = wait_time


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
    phases: Phases | None = None,
) -> dict[str, Any]:
    import gevent
    from locust import User, constant_throughput, events
    from locust.env import Environment

    from loadtests.clients import notes

    weights = notes.MIXES[mix]
    if phases is None:
        counts = user_counts(weights, users)
    else:
        if users % phases.shares:
            raise ValueError(f"{users} users do not split into {phases.shares} equal shares")
        # Each share the same mix: a share's split, times the shares.
        counts = {
            c: n * phases.shares for c, n in user_counts(weights, users // phases.shares).items()
        }
    classes: list[type[User]] = []
    for user_class, weight in weights.items():
        user_class.weight = weight
        # Fixed counts: locust's weighted rounding gives a small run no writer at all.
        user_class.fixed_count = counts[user_class]
        if rate_per_user is not None:
            # Open-ish loop: each user aims at a fixed rate, so the offered load
            # is users x rate whatever the latency (for runs below saturation).
            user_class.wait_time = constant_throughput(rate_per_user)
        if phases is not None:
            _gate(user_class, phases, counts[user_class] // phases.shares)
        classes.append(user_class)
    notes.seed(host, seed_notes)

    # stop_timeout: at the end every user finishes the request it has in
    # flight, so each create the service stored was also seen by the client
    # (else the audit would count it as unexpected).
    env = Environment(user_classes=classes, events=events, host=host, stop_timeout=15)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)  # type: ignore[no-untyped-call]
    started = time.time()
    if phases is not None:
        phases.started = started
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
    parser.add_argument("--mix", default="read-mostly", choices=MIX_NAMES)
    parser.add_argument("--seed-notes", type=int, default=200)
    parser.add_argument(
        "--rate-per-user", type=float, help="requests/s per user (default: closed loop)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every request")
    parser.add_argument("--started-file", type=Path, help="written when the load starts")
    parser.add_argument(
        "--shares", type=int, default=1, help="equal shares of the users, for --phases"
    )
    parser.add_argument(
        "--phases", help="SECONDS:ACTIVE_SHARES,... e.g. 0:1,23:8 (default: every user always)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration_s <= 3600:
        parser.error("--duration-s must be between 0 and 3600")
    phases = None
    if args.phases is not None:
        try:
            phases = Phases.parse(args.shares, args.phases)
        except ValueError as exc:
            parser.error(f"--phases: {exc}")
    result = run(
        args.host,
        users=args.users,
        duration_s=args.duration_s,
        mix=args.mix,
        seed_notes=args.seed_notes,
        rate_per_user=args.rate_per_user,
        started_file=args.started_file,
        phases=phases,
    )
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
