"""A stand-in OTLP/HTTP collector for benchmarks: accepts every export and counts it.

    python -m loadtests.benchmarks.collector --port 4318

Answers POST /v1/traces, /v1/metrics and /v1/logs with 200 and an empty body,
as a healthy collector would, and counts requests, bytes and (for traces)
spans, decoded from the protobuf the exporters send. GET /stats returns the
counts as JSON, so a benchmark can check that export really happened. It
keeps nothing else; it listens on loopback only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

MAX_BODY = 64 * 1024 * 1024  # larger than any batch the SDK sends


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_path: dict[str, dict[str, int]] = {}

    def add(self, path: str, size: int, spans: int) -> None:
        with self.lock:
            entry = self.by_path.setdefault(path, {"requests": 0, "bytes": 0, "spans": 0})
            entry["requests"] += 1
            entry["bytes"] += size
            entry["spans"] += spans

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {path: dict(entry) for path, entry in self.by_path.items()}


def spans_in(body: bytes) -> int:
    request = ExportTraceServiceRequest.FromString(body)
    return sum(
        len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans
    )


def make_handler(counts: Counts) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                self.send_error(413)
                return
            body = self.rfile.read(length)
            spans = spans_in(body) if self.path == "/v1/traces" else 0
            counts.add(self.path, length, spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.path != "/stats":
                self.send_error(404)
                return
            body = json.dumps(counts.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmarks.collector", description=__doc__
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(Counts()))
    print(f"collector listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
