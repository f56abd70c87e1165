"""Benchmark: what FastAPI's parameters and dependencies cost the hot read, against none.

    python -m loadtests.benchmarks.route_cost   # ~1 min; docs/results/route-cost.{md,json,png}

The hot read (GET /v1/notes/{id}) takes the Request and nothing else from
FastAPI: it reads its two optional headers, If-None-Match and
Consistency-Token, from `request.headers`, builds its `CachedReads` with a
plain call instead of a dependency, and declares the headers in OpenAPI by
hand (service/deps.py, `header_parameter`). This is the measurement behind
that choice. In one process, round after round in a rotated order, it times
(CPU time of the calling thread, per request) FastAPI apps called in-process
as uvicorn would hand them a request, each answering a fixed body:

  path-only        GET /n/{id}: the UUID path parameter only (the floor)
  params           the hot read's shape as it was: a dependency taking the
                   Request and the Consistency-Token header as a parameter,
                   and If-None-Match as a parameter of the route
  dependency       the same dependency and route, both reading the headers
                   from request.headers instead of as parameters
  by-hand          no dependency: the route takes the Request and reads both
                   headers itself (the hot read as it is)
  probes-first     the by-hand route in an included router, after a router
                   of ten probe routes (the node's five probe paths, GET and
                   HEAD), as the node included them before
  domain-first     the same two routers, the domain's first (as it does now)

Requests carry neither header, as the efficiency benchmark's reads do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from starlette.types import Message, Scope

from loadtests import report as reports

RESULTS = reports.RESULTS / "route-cost"
BODY = b'{"id": "n"}'
PATH_ONLY, PARAMS, DEPENDENCY, BY_HAND = "path-only", "params", "dependency", "by-hand"
PROBES_FIRST, DOMAIN_FIRST = "probes-first", "domain-first"

Case = Callable[[], Awaitable[None]]


def _apps() -> dict[str, FastAPI]:
    path_only, params, dependency, by_hand = FastAPI(), FastAPI(), FastAPI(), FastAPI()

    def answer() -> Response:
        return Response(BODY, media_type="application/json")

    @path_only.get("/n/{note_id}")
    async def read_path_only(note_id: uuid.UUID) -> Response:
        return answer()

    async def token_param(
        request: Request, token: Annotated[str | None, Header(alias="Consistency-Token")] = None
    ) -> str | None:
        return token

    @params.get("/n/{note_id}")
    async def read_params(
        note_id: uuid.UUID,
        token: Annotated[str | None, Depends(token_param)],
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        return answer()

    async def token_by_hand(request: Request) -> str | None:
        return request.headers.get("consistency-token")

    @dependency.get("/n/{note_id}")
    async def read_dependency(
        note_id: uuid.UUID, request: Request, token: Annotated[str | None, Depends(token_by_hand)]
    ) -> Response:
        request.headers.get("if-none-match")
        return answer()

    @by_hand.get("/n/{note_id}")
    async def read_by_hand(note_id: uuid.UUID, request: Request) -> Response:
        request.headers.get("consistency-token")
        request.headers.get("if-none-match")
        return answer()

    apps = {PATH_ONLY: path_only, PARAMS: params, DEPENDENCY: dependency, BY_HAND: by_hand}
    # The by-hand route in an included router, with the node's ten probe
    # routes (five paths, GET and HEAD) included before it or after it.
    for name, domain_first in ((PROBES_FIRST, False), (DOMAIN_FIRST, True)):
        probes, domain, app = APIRouter(), APIRouter(), FastAPI()
        for path in ("/livez", "/startupz", "/readyz", "/readyz/{check}", "/healthz"):
            probes.add_api_route(path, answer, methods=["HEAD"])
            probes.add_api_route(path, answer, methods=["GET"])
        domain.add_api_route("/v1/n/{note_id}", read_by_hand, methods=["GET"])
        for router in (domain, probes) if domain_first else (probes, domain):
            app.include_router(router)
        apps[name] = app
    return apps


def _case(app: FastAPI, prefix: str = "/n/") -> Case:
    path = f"{prefix}{uuid.uuid4()}"

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    async def call() -> None:
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"node")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        await app(scope, receive, send)

    return call


async def _timed(case: Case, calls: int) -> float:
    started = time.thread_time()
    for _ in range(calls):
        await case()
    return (time.thread_time() - started) / calls * 1e6


async def _measure(rounds: int, calls: int) -> dict[str, list[float]]:
    cases = {
        name: _case(app, "/v1/n/" if name in (PROBES_FIRST, DOMAIN_FIRST) else "/n/")
        for name, app in _apps().items()
    }
    for case in cases.values():
        await _timed(case, max(1, calls // 10))
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(await _timed(cases[name], calls))
    return times


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    times = asyncio.run(_measure(args.rounds, args.calls))
    saved = [p - h for p, h in zip(times[PARAMS], times[BY_HAND], strict=True)]
    first = [p - d for p, d in zip(times[PROBES_FIRST], times[DOMAIN_FIRST], strict=True)]
    return reports.stamped(
        reports.command_line("loadtests.benchmarks.route_cost", argv or []),
        {
            "setup": {"rounds": args.rounds, "calls": args.calls},
            "rounds": times,
            "summary": {
                name: {
                    "us_per_request_median": round(statistics.median(values), 2),
                    "us_per_request_range": [round(min(values), 2), round(max(values), 2)],
                }
                for name, values in times.items()
            },
            "saved_by_hand": {
                "us_median": round(statistics.median(saved), 2),
                "us_range": [round(min(saved), 2), round(max(saved), 2)],
            },
            "saved_domain_first": {
                "us_median": round(statistics.median(first), 2),
                "us_range": [round(min(first), 2), round(max(first), 2)],
            },
        },
    )


def markdown(report: dict[str, Any]) -> str:
    s, saved, setup = report["summary"], report["saved_by_hand"], report["setup"]
    first = report["saved_domain_first"]
    lines = [
        "# What FastAPI's parameters and dependencies cost the hot read",
        "",
        reports.measured(report),
        "",
        f"**Taking the Request alone and reading the two headers by hand saves "
        f"{saved['us_median']:.1f} µs of CPU per request** against a dependency and header "
        f"parameters (per round {saved['us_range'][0]:.1f} to {saved['us_range'][1]:.1f} µs): "
        f"{s[PARAMS]['us_per_request_median']:.0f} µs with them, "
        f"{s[BY_HAND]['us_per_request_median']:.0f} µs by hand, "
        f"{s[PATH_ONLY]['us_per_request_median']:.0f} µs with the path parameter alone.",
        "",
        f"**Including the domain's router before the ten probe routes saves "
        f"{first['us_median']:.1f} µs per request of the domain** (per round "
        f"{first['us_range'][0]:.1f} to {first['us_range'][1]:.1f} µs): FastAPI tries the "
        "routes in order, each at a cost.",
        "",
        "![µs per request by case and round](route-cost.png)",
        "",
        "| case | µs per request (median) | range over rounds |",
        "| --- | ---: | --- |",
    ]
    for name, row in s.items():
        low, high = row["us_per_request_range"]
        lines.append(f"| `{name}` | {row['us_per_request_median']:.1f} | {low:.1f}-{high:.1f} |")
    lines += [
        "",
        *reports.how_measured(report),
        f"- {setup['rounds']} rounds of {setup['calls']} requests per case, in one process, the "
        "order rotated each round; CPU time of the calling thread (the event loop's), per "
        "request, each app called in-process as uvicorn would hand it a request (no socket).",
        "- Every app answers the same fixed body; the requests carry neither header. The saving "
        "is `params` minus `by-hand`, taken within each round; the routers' is "
        "`probes-first` minus `domain-first`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    for name, values in report["rounds"].items():
        axes.plot(range(1, len(values) + 1), values, marker="o", label=name)
    axes.set_xlabel("round")
    axes.set_ylabel("CPU µs per request")
    axes.set_ylim(bottom=0)
    axes.set_title("A GET with a UUID path parameter, in-process")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmarks.route_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000, help="requests per case and round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.{json,md,png}")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument(
        "--no-lock", action="store_true", help="skip the machine-wide lock (smoke runs)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    return reports.run_and_print(
        "bench_route_cost",
        args.out,
        render_only=args.render,
        measure=lambda: measure(args, argv),
        markdown=markdown,
        plot=plot,
        lock=not args.no_lock,
    )


if __name__ == "__main__":
    sys.exit(main())
