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


def test_fastapis_own_routes_are_tried_last(settings: Settings) -> None:
    # The OpenAPI document and the docs pages are asked for rarely; FastAPI adds
    # them first, at construction, and create_app moves them behind every other.
    app = create_app(settings)
    urls = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url}
    routes = app.router.routes
    own = [i for i, route in enumerate(routes) if getattr(route, "path", None) in urls]
    assert None not in urls and len(own) == len(urls), urls
    assert min(own) == len(routes) - len(urls), [
        getattr(route, "path", type(route).__name__) for route in routes
    ]
