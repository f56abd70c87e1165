"""What every test folder shares: the skip-or-fail rule for missing dependencies
and the one way to wait for a condition (bounded in time, never a bare loop)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import pytest

# Any truthy CI (CI=1, CI=true, CI=yes, CI=on, GitLab's and GitHub's values)
# means "run everything": a missing dependency is a failure there, not a skip.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def require(condition: bool, reason: str) -> None:
    """Skip when a dependency is missing, but fail under CI: CI must run everything."""
    if not condition:
        if IN_CI:
            pytest.fail(f"missing dependency under CI: {reason}")
        pytest.skip(reason)


def wait_until(
    predicate: Callable[[], object], *, timeout_s: float, interval_s: float = 0.005
) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout_s`.

    Exceptions from `predicate` propagate: a check that can fail transiently
    catches its own errors and returns False.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], Awaitable[object]], *, timeout_s: float, interval_s: float = 0.05
) -> float | None:
    """`wait_until` for a predicate that must await (an ASGI client, a database)."""
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        if await predicate():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(interval_s)
