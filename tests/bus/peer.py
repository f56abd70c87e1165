"""A bus in a process of its own, for tests that need a peer they can stop, kill or starve.

    python -m tests.bus.peer [--rate N] [--key-bytes B] [--hwm H] [--linger-s S]

Settings come from CATTLE_* variables (node id, peers, timings). It prints
one JSON line with its endpoint, waits for `go` on stdin when --rate is
given, then publishes N invalidations a second; on SIGTERM it closes the bus
and prints how the close went as a last JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time

from service.bus import Bus
from service.config import Settings


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--key-bytes", type=int, default=16)
    # Unvalidated overrides: the broken variants the tests compare against.
    parser.add_argument("--hwm", type=int)
    parser.add_argument("--linger-s", type=float)
    parser.add_argument("--close-timeout-s", type=float, default=5.0)
    parser.add_argument(
        "--no-zmtp-heartbeats", action="store_true", help="isolate the HWM: no ZMTP PINGs"
    )
    args = parser.parse_args()
    if args.no_zmtp_heartbeats:
        Bus._heartbeat_options = lambda self, sock: None  # type: ignore[method-assign]
    settings = Settings()
    update: dict[str, object] = {}
    if args.hwm is not None:
        update["bus_hwm"] = args.hwm
    if args.linger_s is not None:
        update["bus_linger_s"] = args.linger_s
    settings = settings.model_copy(update=update)
    bus = Bus(settings, status=lambda: {"state": "ready"})
    await bus.start()
    print(json.dumps({"endpoint": bus.endpoint, "epoch": bus.epoch}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.rate:
        await loop.run_in_executor(None, sys.stdin.readline)  # "go"
        key = "k" * args.key_bytes
        interval_s = 1.0 / args.rate
        lsn = 0
        next_at = time.monotonic()
        while not stop.is_set():
            lsn += 1
            bus.publish_invalidations([key], lsn)
            next_at += interval_s
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                await asyncio.sleep(0)
    else:
        await stop.wait()
    started = time.monotonic()
    clean = await bus.close(args.close_timeout_s)
    print(json.dumps({"closed": clean, "close_s": time.monotonic() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
