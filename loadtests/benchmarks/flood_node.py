"""A cattle node whose bus also publishes a steady flood of invalidations (for bus_stall).

    BENCH_FLOOD_RATE=1000 BENCH_FLOOD_KEY_BYTES=1000 python -m loadtests.benchmarks.flood_node

It is `python -m service serve` with one change: once the bus has started,
a task publishes BENCH_FLOOD_RATE invalidation messages a second, each one
key of BENCH_FLOOD_KEY_BYTES bytes, through the bus's own publish and send path, each
flushed as a message of its own (a node's writes coalesce per loop tick). A node's writes could
not make 1000 messages a second on this machine's one core; the flood lets
the benchmark load the bus at that rate and still serve reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from service.bus import runtime
from service.bus.bus import Bus

RATE = float(os.environ.get("BENCH_FLOOD_RATE", "1000"))
KEY_BYTES = int(os.environ.get("BENCH_FLOOD_KEY_BYTES", "1000"))


class FloodingBus(Bus):
    _flood_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._flood_task = asyncio.get_running_loop().create_task(self._flood())

    async def _flood(self) -> None:
        loop = asyncio.get_running_loop()
        started, sent = loop.time(), 0
        while True:
            # As many messages as are due by now, each its own message: a busy
            # loop wakes this task less often than 1000 times a second.
            due = int((loop.time() - started) * RATE) + 1
            while sent < due:
                self.publish_invalidations([f"flood/{sent:012d}/" + "k" * KEY_BYTES], None)
                self._flush()  # now, not after the tick: one key, one message
                sent += 1
            await asyncio.sleep(1 / RATE)

    async def close(self, timeout_s: float) -> bool:
        if self._flood_task is not None:
            self._flood_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flood_task
        return await super().close(timeout_s)


if __name__ == "__main__":
    runtime.Bus = FloodingBus  # type: ignore[attr-defined]
    from service.__main__ import main

    sys.exit(main(["serve"]))
