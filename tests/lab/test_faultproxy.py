"""The lab's TCP fault proxy: each mode does to a connection what it says.

A small upstream on loopback answers every line with a reply of a known
size; the proxy sits between it and the test's client sockets.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from deploy.lab.faultproxy import FaultProxy, Mode
from deploy.lab.postgres import free_port

REPLY_BYTES = 100_000


class _Reply(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the proxy resets and cuts connections
            while self.rfile.readline():
                self.wfile.write(b"x" * (REPLY_BYTES - 1) + b"\n")
                self.wfile.flush()


@pytest.fixture
def upstream() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Reply)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ("127.0.0.1", server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", 0), upstream) as running:
        yield running


def _connect(proxy: FaultProxy, timeout_s: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.listen, timeout=timeout_s)


def _ask(sock: socket.socket) -> bytes:
    """Send one line; read until the reply's newline, the peer closes, or the timeout."""
    sock.sendall(b"hello\n")
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _ask_twice(sock: socket.socket) -> None:
    # A reset may surface on the send or on the read that follows it.
    _ask(sock)
    _ask(sock)


def test_pass_forwards_every_byte_both_ways(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert len(_ask(sock)) == REPLY_BYTES
        assert len(_ask(sock)) == REPLY_BYTES  # the connection stays usable


def test_delay_adds_latency_to_each_chunk(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        started = time.monotonic()
        _ask(sock)
        baseline_s = time.monotonic() - started
        proxy.set_mode("delay 0.3")
        started = time.monotonic()
        assert len(_ask(sock)) == REPLY_BYTES
        assert time.monotonic() - started >= 0.6 + baseline_s / 2  # request and reply held


def test_stall_goes_silent_without_closing_and_resumes(proxy: FaultProxy) -> None:
    with _connect(proxy, timeout_s=0.5) as old, _connect(proxy, timeout_s=0.5) as before:
        _ask(old)
        proxy.set_mode("stall")
        with pytest.raises(TimeoutError):
            _ask(old)  # an open connection: no answer, no error
        with _connect(proxy, timeout_s=0.5) as new, pytest.raises(TimeoutError):
            _ask(new)  # new connections are accepted and left silent
        proxy.set_mode("pass")
        before.settimeout(2)
        assert len(_ask(before)) == REPLY_BYTES  # what was held is forwarded


def test_reset_resets_open_and_new_connections(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _ask(sock)
        proxy.set_mode("reset")
        with pytest.raises(ConnectionResetError):
            _ask_twice(sock)
    # The proxy resets a new connection as soon as it accepts it, which may
    # be before the client's connect() has returned: either way it is reset.
    with pytest.raises(ConnectionResetError), _connect(proxy) as sock:
        _ask(sock)


def test_cut_closes_mid_response(proxy: FaultProxy) -> None:
    proxy.set_mode("cut 1000")
    with _connect(proxy) as sock:
        received = _ask(sock)
    assert len(received) == 1000  # part of the reply, then the end of the stream


def test_modes_are_parsed_with_a_clear_error() -> None:
    assert str(Mode.parse("delay 0.25")) == "delay 0.25"
    assert Mode.parse("CUT 10").cut_after_bytes == 10
    with pytest.raises(ValueError, match=r"modes: pass \| delay SECONDS"):
        Mode.parse("delay soon")


def test_the_control_port_switches_a_proxy_process(upstream: tuple[str, int]) -> None:
    listen, control = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.lab.faultproxy", "--listen", f"127.0.0.1:{listen}",
         "--target", f"{upstream[0]}:{upstream[1]}", "--control", f"127.0.0.1:{control}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and "fault proxy" in process.stdout.readline()

        def command(line: str) -> str:
            with socket.create_connection(("127.0.0.1", control), timeout=2) as sock:
                sock.sendall(line.encode() + b"\n")
                return sock.makefile().readline().strip()

        assert command("cut 10") == "ok cut 10"
        assert command("slow").startswith("error: cannot read 'slow'")
        with socket.create_connection(("127.0.0.1", listen), timeout=2) as sock:
            assert len(_ask(sock)) == 10
        assert command("pass") == "ok pass"
        with socket.create_connection(("127.0.0.1", listen), timeout=2) as sock:
            assert len(_ask(sock)) == REPLY_BYTES
    finally:
        process.kill()
        process.wait(timeout=5)
