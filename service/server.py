"""Run one node: uvicorn with uvloop and httptools, one process."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.config import Settings


def serve(settings: Settings) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
        log_level="info",
    )
    uvicorn.Server(config).run()
