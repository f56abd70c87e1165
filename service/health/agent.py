"""The HAProxy agent-check responder: one line per connection on CATTLE_AGENT_PORT.

HAProxy's `agent-check` opens a TCP connection, reads one line and closes.
The line sets the server's state and weight in HAProxy without a reload:

    up ready 73%      serving; weight = share of CATTLE_MAX_IN_FLIGHT still free
    drain             draining or stopping: no new sessions, existing ones finish
    down#<reason>     not ready (starting, or a critical check fails)

The answer comes from memory (lifecycle state, cached checks, in-flight
count), so an agent poll costs a syscall or two and never touches the
database. The port closes when the HTTP listener does (STOPPING): HAProxy
treats an unreachable agent as "no news" and leaves the verdict to the HTTP
health check, which by then is failing too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from service.health.checks import HealthChecker
from service.health.lifecycle import Lifecycle, State

log = logging.getLogger("service.health.agent")

# A peer that does not read its line within this long is not HAProxy.
_WRITE_TIMEOUT_S = 1.0
_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:=/-]+")


def agent_reply(lifecycle: Lifecycle, checker: HealthChecker) -> str:
    """The line HAProxy reads, from the node's state right now."""
    state = lifecycle.state
    # Still `drain` while stopping (a poll accepted just before the port
    # closed): `down` could make a proxy configured with `on-marked-down
    # shutdown-sessions` cut the requests this node is finishing.
    if state in (State.draining, State.stopping):
        return "drain\n"
    if state is State.stopped:
        return "down#stopped\n"
    ready, failing = checker.readiness()
    if not ready:
        reason = "; ".join(f"{r.name} {r.output}" for r in failing)
        return f"down#{_UNSAFE.sub(' ', reason)[:120].strip()}\n"
    return f"up ready {checker.weight_percent()}%\n"


class AgentServer:
    """A tiny asyncio TCP server; `close()` is synchronous so a lifecycle listener may call it."""

    def __init__(self, lifecycle: Lifecycle, checker: HealthChecker) -> None:
        self.lifecycle = lifecycle
        self.checker = checker
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._answer, host, port, reuse_address=True)
        log.info("agent-check responder on %s:%d", host, port)

    def close(self) -> None:
        if self._server is not None and self._server.is_serving():
            self._server.close()
            log.info("agent-check responder closed")

    async def wait_closed(self, timeout_s: float) -> None:
        if self._server is None:
            return
        self.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout_s)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(agent_reply(self.lifecycle, self.checker).encode("ascii"))
            await asyncio.wait_for(writer.drain(), _WRITE_TIMEOUT_S)
        except (OSError, TimeoutError):
            pass  # the peer went away; it will ask again
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _WRITE_TIMEOUT_S)
