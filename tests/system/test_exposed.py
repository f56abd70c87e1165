"""A node exposed to clients directly (anycast, no proxy in front) defends
itself: request heads bounded in size and count (431), slow heads and bodies
cut off (408), a staged close so a client still sending reads the answer, and
a body shorter than its Content-Length not waited for forever.

Each test talks to a real node process over loopback with raw sockets or
urllib, the way a hostile or careless client would. The node's bounds are set
short here (CATTLE_*_TIMEOUT_S) so the tests run in seconds; the limits are
the defaults.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from deploy.lab.node import Node
from tests import hardening
from tests.system.conftest import StartNode

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
LINGER_TIMEOUT_S = 2.0
# Scheduling slack on a shared two-core machine, on top of a configured bound.
SLACK_S = 1.5
FAST_LIVEZ_S = 0.5

ENV = {
    "CATTLE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "CATTLE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "CATTLE_LINGER_TIMEOUT_S": str(LINGER_TIMEOUT_S),
    "CATTLE_ACCESS_LOG": "false",
}
PROBLEM = "urn:cattle:problem:"


def _connect(node: Node, timeout_s: float = 5.0) -> socket.socket:
    return socket.create_connection((node.host, node.port), timeout=timeout_s)


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    """Read one response to its end (Content-Length) or the connection's end."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _problem(status: int, headers: dict[str, str], body: bytes) -> dict[str, object]:
    assert headers.get("content-type") == "application/problem+json", headers
    document: dict[str, object] = json.loads(body)
    assert document["status"] == status
    return document


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _livez_s(node: Node) -> float:
    started = time.monotonic()
    assert node.get("/livez", timeout_s=10).status == 200
    return time.monotonic() - started


def _record(node: Node, tried: str, answer: str, wait_s: float, audit: str = "-") -> None:
    """One row of the hardening table; the node must still be ready afterwards."""
    healthy = node.get("/readyz", timeout_s=10).status == 200
    hardening.record(
        "exposed node", tried, answer=answer, wait_s=wait_s, healthy=healthy, audit=audit
    )


def test_a_header_over_the_limit_gets_a_431_problem(start_node: StartNode) -> None:
    node = start_node(ENV)
    with _connect(node) as sock:
        # Sent whole before reading, as simple clients do: the node must read
        # past its refusal (staged close) for this client to see the 431.
        sent = time.monotonic()
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        status, headers, body = _read_response(sock, timeout_s=5)
        took = time.monotonic() - sent
    document = _problem(431, headers, body)
    assert status == 431
    assert document["type"] == PROBLEM + "request-header-fields-too-large"
    assert "CATTLE_MAX_HEADER_BYTES" in str(document["detail"])
    assert headers.get("x-served-by") == node.name
    assert node.get("/livez").status == 200
    _record(
        node,
        "one 64 KiB header, sent whole",
        hardening.answer_of(status, headers.get("content-type"), body),
        took,
    )


def test_too_many_headers_get_a_431_problem(start_node: StartNode) -> None:
    node = start_node(ENV)
    many = {f"X-H{i}": "v" for i in range(150)}
    sent = time.monotonic()
    reply = node.get("/livez", headers=many)
    took = time.monotonic() - sent
    document = _problem(431, reply.headers, reply.body)
    assert document["type"] == PROBLEM + "request-header-fields-too-large"
    assert "CATTLE_MAX_HEADER_COUNT" in str(document["detail"])
    # Well within the count, the same request is served.
    assert node.get("/livez", headers=dict(list(many.items())[:50])).status == 200
    answer = hardening.answer_of(reply.status, reply.headers.get("content-type"), reply.body)
    _record(node, "150 headers", answer, took, "50 headers served")


@dataclass
class _Flood:
    """A client pushing one endless header at the node without reading."""

    node: Node
    size: int
    sent: int = 0
    error: str | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        chunk = b"a" * 65536
        try:
            with _connect(self.node, timeout_s=30) as sock:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                while self.sent < self.size:
                    sock.sendall(chunk)
                    self.sent += len(chunk)
        except OSError as exc:  # the node closing on it is the expected end
            self.error = type(exc).__name__


def test_four_50_mb_headers_leave_memory_flat_and_livez_fast(start_node: StartNode) -> None:
    node = start_node(ENV)
    assert node.pid is not None
    rss_before = _rss_bytes(node.pid)
    floods = [_Flood(node, 50 * 1024 * 1024) for _ in range(4)]
    rss_peak, livez = rss_before, []
    deadline = time.monotonic() + 60
    while any(f.thread.is_alive() for f in floods) and time.monotonic() < deadline:
        livez.append(_livez_s(node))
        rss_peak = max(rss_peak, _rss_bytes(node.pid))
        time.sleep(0.02)
    for flood in floods:
        flood.thread.join(5)
        assert not flood.thread.is_alive(), "a flood is still sending after 60 s"
    livez.append(_livez_s(node))
    grew = rss_peak - rss_before
    print(
        f"floods sent {[f.sent >> 20 for f in floods]} MiB ({[f.error for f in floods]}); "
        f"RSS {rss_before >> 20} MiB, grew {grew >> 20} MiB; "
        f"livez x{len(livez)}, slowest {max(livez) * 1000:.0f} ms"
    )
    # Each flood is cut off once the node has dropped CATTLE_LINGER_MAX_BYTES
    # of it past its 431 (the default, 16 MiB), far short of 50 MB.
    assert all(f.error is not None and f.sent < 50 * 1024 * 1024 for f in floods)
    assert grew < rss_before // 4, f"RSS grew {grew >> 20} MiB from {rss_before >> 20} MiB"
    assert max(livez) < FAST_LIVEZ_S
    _record(
        node,
        "four 50 MB headers at once, the answer not read",
        "each cut off before 50 MB was sent",
        max(livez),
        f"RSS grew < 1/4; /livez served meanwhile, under {FAST_LIVEZ_S} s (the wait shown)",
    )


def test_slow_heads_and_bodies_are_cut_off_while_others_are_served(
    start_node: StartNode,
) -> None:
    """1,100 connections trickling: 1,000 heads a few bytes at a time, 100
    bodies a byte at a time. Each is answered 408 (or closed) within its bound
    while ordinary requests on fresh connections keep being served."""
    node = start_node(ENV)
    heads, bodies = 1000, 100
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float]] = {}
    ended: dict[socket.socket, tuple[float, bytes]] = {}
    body_head = (
        b"POST /v1/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    try:
        for i in range(heads + bodies):
            sock = _connect(node)
            kind = "head" if i < heads else "body"
            sock.sendall(b"GET /livez HTTP/1.1\r\n" if kind == "head" else body_head)
            sock.setblocking(False)
            opened[sock] = (kind, time.monotonic())
            selector.register(sock, selectors.EVENT_READ)
        served: list[float] = []
        last_trickle = 0.0
        deadline = time.monotonic() + max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 10
        while len(ended) < len(opened) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.05):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(65536)
                except OSError:
                    data = b""
                ended[ready] = (time.monotonic(), data)
                selector.unregister(ready)
            if time.monotonic() - last_trickle > 0.2:
                last_trickle = time.monotonic()
                for sock, (kind, _) in opened.items():
                    if sock not in ended:
                        with contextlib.suppress(OSError):
                            sock.send(b"X-Slow: 1\r\n" if kind == "head" else b" ")
                served.append(_livez_s(node))
    finally:
        selector.close()
        for sock in opened:
            sock.close()

    assert len(ended) == len(opened), f"{len(opened) - len(ended)} slow clients never cut off"
    took = {
        kind: max(ended[s][0] - t for s, (k, t) in opened.items() if k == kind)
        for kind in ("head", "body")
    }
    answers = [data.split(b" ", 2)[1] for _, data in ended.values() if data]
    print(
        f"cut off: heads in <= {took['head']:.2f} s, bodies in <= {took['body']:.2f} s "
        f"(answers: {sorted(set(answers))}, {len(answers)} of {len(ended)}); "
        f"livez x{len(served)} meanwhile, slowest {max(served) * 1000:.0f} ms"
    )
    assert took["head"] < HEADER_TIMEOUT_S + SLACK_S
    assert took["body"] < HEADER_TIMEOUT_S + BODY_TIMEOUT_S + SLACK_S
    assert set(answers) <= {b"408"}
    assert len(served) >= 3 and max(served) < FAST_LIVEZ_S
    audit = f"/livez served meanwhile, under {FAST_LIVEZ_S} s"
    _record(node, f"{heads} heads trickled a line at a time", "408 or closed", took["head"], audit)
    _record(
        node, f"{bodies} bodies trickled a byte at a time", "408 or closed", took["body"], audit
    )


def test_a_5_mb_body_with_connection_close_reads_its_413(start_node: StartNode) -> None:
    node = start_node(ENV)
    request = urllib.request.Request(  # noqa: S310 (loopback)
        node.base_url + "/v1/notes",
        data=b"{" + b" " * (5 * 1000 * 1000) + b"}",
        headers={"Content-Type": "application/json", "Connection": "close"},
        method="POST",
    )
    sent = time.monotonic()
    try:
        urllib.request.urlopen(request, timeout=30)  # noqa: S310
        raise AssertionError("a 5 MB note was accepted")
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    took = time.monotonic() - sent
    document = _problem(413, headers, body)
    assert status == 413
    assert "CATTLE_MAX_BODY_BYTES" in str(document["detail"])
    assert node.get("/livez").status == 200
    answer = hardening.answer_of(status, headers.get("content-type"), body)
    _record(node, "a 5 MB body with Connection: close (urllib)", answer, took)


def test_a_body_shorter_than_its_content_length_gets_a_408_within_the_bound(
    start_node: StartNode,
) -> None:
    node = start_node(ENV)
    with _connect(node) as sock:
        sent = time.monotonic()
        sock.sendall(
            b"POST /v1/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"title": "short"}'
        )
        status, headers, body = _read_response(sock, timeout_s=BODY_TIMEOUT_S + 10)
        took = time.monotonic() - sent
    document = _problem(408, headers, body)
    print(f"short body answered {status} after {took:.2f} s")
    assert status == 408
    assert document["type"] == PROBLEM + "request-timeout"
    assert "CATTLE_BODY_TIMEOUT_S" in str(document["detail"])
    assert took < BODY_TIMEOUT_S + SLACK_S
    assert node.get("/livez").status == 200
    answer = hardening.answer_of(status, headers.get("content-type"), body)
    _record(node, "a body shorter than its Content-Length", answer, took)


def test_a_connection_that_sends_nothing_is_closed_within_the_head_bound(
    start_node: StartNode,
) -> None:
    node = start_node(ENV)
    with _connect(node) as sock:
        opened = time.monotonic()
        sock.settimeout(HEADER_TIMEOUT_S + 10)
        data = sock.recv(65536)  # b"" when the node closes: nothing was asked
        took = time.monotonic() - opened
    print(f"a silent connection was closed after {took:.2f} s with {data!r}")
    assert data == b""
    assert HEADER_TIMEOUT_S * 0.9 < took < HEADER_TIMEOUT_S + SLACK_S
    _record(node, "a connection that sends nothing", "closed, no answer", took)
