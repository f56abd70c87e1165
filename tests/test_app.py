"""How create_app assembles a node."""

from __future__ import annotations

from service.app import create_app
from service.config import Settings

PROBES = ("/livez", "/startupz", "/readyz", "/healthz")


def test_the_domains_routes_are_tried_before_the_probes(settings: Settings) -> None:
    # FastAPI tries routes in order, each at a cost (docs/results/route-cost.md);
    # OpenAPI lists the paths in that order.
    paths = list(create_app(settings).openapi()["paths"])
    first_probe = min(i for i, path in enumerate(paths) if path.startswith(PROBES))
    domain = [i for i, path in enumerate(paths) if path.startswith("/v1/")]
    assert domain and max(domain) < first_probe, paths
