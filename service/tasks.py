"""Background tasks of a node: stop them within a bound, whatever they were doing."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_within(task: asyncio.Task[None] | None, timeout_s: float) -> None:
    """Cancel `task` and wait for it at most `timeout_s`; a task that ignores
    cancellation must not hold up a node's shutdown."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, timeout_s)
