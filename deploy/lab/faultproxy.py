"""A TCP proxy that injects the faults a real network and a real database show.

Put it between nodes and PostgreSQL (or anything else that speaks TCP) and
switch its mode while traffic flows:

    pass          forward both ways (the default)
    delay S       hold every chunk S seconds before forwarding it (latency)
    stall         forward nothing more, keep every socket open, accept new
                  connections and leave them silent: a frozen server or a
                  half-open path, which no error announces
    reset         close every connection with a TCP reset, refuse none: new
                  connections are reset as soon as they are accepted
    cut N         forward N more bytes towards the client on each connection,
                  then close it: a connection lost mid-response

Kernel queueing disciplines (netem) would do this below TCP; they are not
available everywhere, a proxy is. Run it in a test's own process
(`FaultProxy(...).start()`) or as a process of the lab:

    python -m deploy.lab.faultproxy --listen 127.0.0.1:6433 --target 127.0.0.1:5432 \\
        --control 127.0.0.1:6434

where the control port takes one command per line (`stall\\n`) and answers
`ok <mode>` or `error: <why>`. Every address must be loopback or inside a
namespace the caller created; the proxy itself does not check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
import threading
from dataclasses import dataclass

CHUNK_BYTES = 65536


@dataclass(frozen=True)
class Mode:
    name: str = "pass"
    delay_s: float = 0.0
    cut_after_bytes: int = 0

    @classmethod
    def parse(cls, line: str) -> Mode:
        """`pass`, `delay 0.5`, `stall`, `reset` or `cut 1000`; ValueError says what works."""
        words = line.split()
        usage = "modes: pass | delay SECONDS | stall | reset | cut BYTES"
        if not words:
            raise ValueError(f"empty command; {usage}")
        name, args = words[0].lower(), words[1:]
        if name in ("pass", "stall", "reset") and not args:
            return cls(name)
        try:
            if name == "delay" and len(args) == 1 and float(args[0]) >= 0:
                return cls(name, delay_s=float(args[0]))
            if name == "cut" and len(args) == 1 and int(args[0]) >= 0:
                return cls(name, cut_after_bytes=int(args[0]))
        except ValueError:
            pass
        raise ValueError(f"cannot read {line.strip()!r}; {usage}")

    def __str__(self) -> str:
        if self.name == "delay":
            return f"delay {self.delay_s:g}"
        if self.name == "cut":
            return f"cut {self.cut_after_bytes}"
        return self.name


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """One listener forwarding to one target, with a mode that can change at any time."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._mode = Mode()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    # -- control -----------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode | str) -> Mode:
        """Switch mode; thread-safe. A reset also resets the connections already open."""
        new = Mode.parse(mode) if isinstance(mode, str) else mode
        if self._loop is None:
            self._mode = new
            return new
        done = threading.Event()

        def apply() -> None:
            self._apply(new)
            done.set()

        self._loop.call_soon_threadsafe(apply)
        if threading.current_thread() is not self._thread:
            done.wait(5)
        return new

    def _apply(self, mode: Mode) -> None:
        self._mode = mode
        if mode.name == "reset":
            for client, upstream in list(self._connections):
                _reset(client)
                _reset(upstream)
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    # -- running in a thread of the caller's process -------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"fault proxy on {self.listen} did not start within 10 s")
        return self

    def _run(self) -> None:
        asyncio.run(self._serve_until_stopped())

    async def _serve_until_stopped(self) -> None:
        await self.open()
        assert self._server is not None
        self._ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    def stop(self) -> None:
        """Close the listener and every connection; bounded."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        stopped = asyncio.run_coroutine_threadsafe(self.close(), loop)
        with contextlib.suppress(Exception):
            stopped.result(timeout=5)
        thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the proxy itself ----------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        sock = self._server.sockets[0]
        self.listen = (self.listen[0], int(sock.getsockname()[1]))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client, upstream in list(self._connections):
            client.transport.abort()
            upstream.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode.name == "reset":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), timeout=5
            )
        except (OSError, TimeoutError):
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._connections.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, towards_client=False),
                self._pipe(up_reader, writer, towards_client=True),
            )
        finally:
            self._connections.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_client: bool
    ) -> None:
        sent_since_cut = 0
        cut_mode: Mode | None = None
        try:
            while True:
                await self._while_stalled()
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                await self._while_stalled()
                mode = self._mode
                if mode.name == "reset":
                    return
                if mode.name == "delay":
                    await asyncio.sleep(mode.delay_s)
                if mode.name == "cut" and towards_client:
                    if cut_mode is not mode:
                        cut_mode, sent_since_cut = mode, 0
                    room = mode.cut_after_bytes - sent_since_cut
                    writer.write(data[: max(0, room)])
                    sent_since_cut += len(data)
                    if sent_since_cut >= mode.cut_after_bytes:
                        with contextlib.suppress(OSError):
                            await writer.drain()
                        writer.close()
                        return
                    await writer.drain()
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            return

    async def _while_stalled(self) -> None:
        while self._mode.name == "stall":
            assert self._changed is not None
            await self._changed.wait()


async def _control(proxy: FaultProxy, host: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    mode = Mode.parse(line.decode("ascii", "replace"))
                except ValueError as exc:
                    writer.write(f"error: {exc}\n".encode())
                else:
                    proxy._apply(mode)
                    writer.write(f"ok {mode}\n".encode())
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:6433)")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab.faultproxy", description=__doc__)
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control", type=_address, required=True, help="HOST:PORT for commands")
    parser.add_argument("--mode", default="pass", help="starting mode (default: pass)")
    args = parser.parse_args(argv)
    try:
        start = Mode.parse(args.mode)
    except ValueError as exc:
        parser.error(str(exc))

    async def run() -> None:
        proxy = FaultProxy(args.listen, args.target)
        await proxy.open()
        proxy._apply(start)
        control = await _control(proxy, *args.control)
        print(f"fault proxy {proxy.listen} -> {proxy.target}, control {args.control}", flush=True)
        async with control:
            await control.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
