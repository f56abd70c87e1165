"""Fixtures for telemetry tests: a node app with no domain, whose spans land in memory.

Each test builds its own app (the OTel globals are never touched), so tests
also show that many apps in one process keep their telemetry apart. The
app serves no domain (telemetry must work for any): the routes that touch
the database are mounted here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import Integer, bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import create_app
from service.config import Settings
from service.db.engines import Database
from service.telemetry import Telemetry
from tests.conftest import serve_asgi

ITEM_ROUTE = "/test/items/{item_id}"
MISSING_ITEM = 404  # item ids at or above this are not found


def add_item_route(app: FastAPI) -> None:
    """GET /test/items/{item_id}: one SQL statement, 200, or 404 for a missing item."""

    async def get_item(item_id: int, request: Request) -> dict[str, int]:
        database: Database = request.state.database
        statement = text("SELECT :id").bindparams(bindparam("id", type_=Integer))

        async def read(session: AsyncSession) -> int:
            return (await session.execute(statement, {"id": item_id})).scalar_one()

        found, _ = await database.run_read(read)
        if found >= MISSING_ITEM:
            raise HTTPException(404, "no such item")
        return {"id": found}

    app.add_api_route(ITEM_ROUTE, get_item)


@dataclass
class RunningNode:
    app: FastAPI
    http: httpx.AsyncClient
    exporter: InMemorySpanExporter
    state: dict[str, Any]  # the lifespan's state: database, settings, ...

    @property
    def telemetry(self) -> Telemetry:
        telemetry: Telemetry = self.app.state.telemetry
        return telemetry

    def spans(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())

    def server_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind is SpanKind.SERVER]


@contextlib.asynccontextmanager
async def running_node(
    settings: Settings, prepare: Callable[[FastAPI], Any] | None = None, *, spans: bool = True
) -> AsyncIterator[RunningNode]:
    """A node app (no domain, the item route) with an in-memory span exporter
    (`spans=False`: none, as a node with no trace export configured), its
    lifespan run, and a client. `prepare(app)` adds routes of a test's own."""
    exporter = InMemorySpanExporter()
    processors = [SimpleSpanProcessor(exporter)] if spans else []
    app = create_app(settings, domains_served=(), span_processors=processors)
    add_item_route(app)
    if prepare is not None:
        prepare(app)
    async with serve_asgi(app) as (http, state):
        # Start-up's own statements (the schema check) are traces of their own.
        exporter.clear()
        yield RunningNode(app, http, exporter, state)


@pytest.fixture
def always_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every trace (the default samples 10% of new traces)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")


@pytest.fixture(autouse=True)
def _no_ambient_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    # An OTEL_* variable in the developer's shell must not change what a test
    # sees; the semantic-convention choice is the app's own (set once per process).
    for name in list(os.environ):
        if name.startswith("OTEL_") and name != "OTEL_SEMCONV_STABILITY_OPT_IN":
            monkeypatch.delenv(name)


@pytest.fixture
def sqlite_settings(sqlite_template: Path, tmp_path: Path) -> Settings:
    """Settings for a node on a fresh, migrated SQLite file (backend-agnostic tests)."""
    path = tmp_path / "node.db"
    shutil.copyfile(sqlite_template, path)
    return Settings(
        database_url=f"sqlite+aiosqlite:///{path}",
        data_dir=tmp_path,
        node_id="test-node",
        environment="production",
        cursor_secret="test-cursor-secret-0123456789",
    )


TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


def traceparent(sampled: bool = True) -> str:
    return f"00-{TRACE_ID}-{PARENT_SPAN_ID}-{'01' if sampled else '00'}"
