"""Client-side helpers for lifecycle tests: probes, the agent port, slow and streamed requests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.lab.node import Node
from deploy.lab.postgres import free_port
from tests.support import wait_until


def agent_port() -> int:
    return free_port("127.0.0.1")


def status_of(node: Node, path: str) -> int | None:
    """The HTTP status of GET `path`, or None when the node does not answer."""
    try:
        return node.get(path, timeout_s=2.0).status
    except OSError:
        return None


def agent_says(port: int, timeout_s: float = 2.0) -> str | None:
    """The agent's line, as HAProxy reads it; None when the port is closed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            data = b""
            while not data.endswith(b"\n") and len(data) < 512:
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            return data.decode("ascii")
    except ConnectionRefusedError:
        return None
    except ConnectionResetError:
        # Connected while the agent's listener was closing: the kernel resets
        # what sat in its accept queue. HAProxy's check fails alike: closed.
        return None


@dataclass
class SlowUpload:
    """POST /v1/notes whose body trickles in over `duration_s`: a request the
    node is in the middle of serving for that long.

    This is how the tests hold requests in flight without a debug endpoint in
    the service: a slow client is the real-world case (a phone on a bad
    network), and the node cannot answer before the body is complete.
    """

    node: Node
    duration_s: float
    chunks: int = 10
    status: int | None = None
    error: BaseException | None = None
    finished_at: float | None = None
    _thread: threading.Thread | None = None
    headers_sent: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SlowUpload:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self.headers_sent.wait(5):
            raise AssertionError("slow upload could not connect")
        return self

    def _run(self) -> None:
        body = json.dumps({"title": "slow", "body": "x" * 200}).encode()
        step = -(-len(body) // self.chunks)
        connection = http.client.HTTPConnection(
            self.node.host, self.node.port, timeout=self.duration_s + 30
        )
        try:
            connection.putrequest("POST", "/v1/notes")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            self.headers_sent.set()
            for i in range(0, len(body), step):
                time.sleep(self.duration_s / self.chunks)
                connection.send(body[i : i + step])
            response = connection.getresponse()
            response.read()
            self.status = response.status
        except BaseException as exc:  # reported to the test, which asserts on it
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.headers_sent.set()
            connection.close()

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "slow upload did not finish in time"


@dataclass(frozen=True)
class Outcome:
    sent_at: float  # monotonic, just before connecting
    status: int | None  # None: failed
    error: str | None  # exception class name when failed
    connection_close: bool = False


class RequestStream:
    """Sequential GETs, each on a fresh connection, until stopped or the node refuses."""

    def __init__(self, node: Node, path: str, *, gap_s: float, max_requests: int) -> None:
        self.node = node
        self.path = path
        self.gap_s = gap_s
        self.max_requests = max_requests
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RequestStream:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> list[Outcome]:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "request stream did not stop"
        return self.outcomes

    def _run(self) -> None:
        refused_in_a_row = 0
        for _ in range(self.max_requests):
            if self._stop.is_set() or refused_in_a_row >= 5:
                return
            sent_at = time.monotonic()
            try:
                reply = self.node.get(self.path, timeout_s=10.0)
                outcome = Outcome(
                    sent_at,
                    reply.status,
                    None,
                    reply.headers.get("connection", "").lower() == "close",
                )
                refused_in_a_row = 0
            except OSError as exc:
                outcome = Outcome(sent_at, None, type(exc).__name__)
                refused_in_a_row += isinstance(exc, ConnectionRefusedError)
            except http.client.HTTPException as exc:
                outcome = Outcome(sent_at, None, type(exc).__name__)
            self.outcomes.append(outcome)
            time.sleep(self.gap_s)


def wait_until_refused(check: Callable[[], int | None], timeout_s: float) -> float | None:
    """Seconds until `check()` returns None (the port refuses)."""
    return wait_until(lambda: check() is None, timeout_s=timeout_s, interval_s=0.01)
