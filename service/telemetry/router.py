"""GET /metrics: the node's metrics in the Prometheus text format, on the API port."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

router = APIRouter()


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # Collecting runs the observable gauges' callbacks; all of them read
    # in-memory state, so a scrape does no I/O.
    body: bytes = request.app.state.telemetry.render_metrics()
    # The classic text format (0.0.4) is what generate_latest writes with its
    # default name escaping, and what every Prometheus version reads.
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)
