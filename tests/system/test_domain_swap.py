"""The domain-swap drill: a fork replaces notes with its own domain, as README.md says.

In a scratch copy of the repository the drill deletes `service/notes/` and
`tests/notes/`, writes a `widgets` domain (one table, one keyed write route,
one migration, one test) by the README's recipe, changes the one line of
`service/domains.py`, and then asks of the copy what `make lint` and the
suite ask: lint, `python -m service migrate` on SQLite and on PostgreSQL, the
infrastructure tests, and the new route's replay over HTTP. Any file outside
the domain that still needed notes makes one of those steps fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import uuid
from pathlib import Path

import pytest

from deploy.lab.postgres import PostgresCluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.postgres, pytest.mark.cluster, pytest.mark.timeout(420)]

# Test folders that must not need the example domain.
INFRASTRUCTURE_TESTS = ["tests/health", "tests/idempotency", "tests/config", "tests/telemetry"]

WIDGETS = {
    "service/widgets/__init__.py": '''
        """Widgets: the domain of the drill (tests/system/test_domain_swap.py)."""
    ''',
    "service/widgets/models.py": '''
        """The widgets table."""

        from __future__ import annotations

        import uuid
        from datetime import datetime

        from sqlalchemy import String, Uuid
        from sqlalchemy.orm import Mapped, mapped_column

        from service.db.base import Base
        from service.db.types import UTCDateTime


        class Widget(Base):
            __tablename__ = "widgets"

            id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
            name: Mapped[str] = mapped_column(String(100))
            created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ''',
    "service/widgets/router.py": '''
        """HTTP routes for widgets: a create that is safe to retry."""

        from __future__ import annotations

        from fastapi import APIRouter, Response
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, ConfigDict, Field
        from sqlalchemy.ext.asyncio import AsyncSession

        from service.db.types import utcnow, uuid7
        from service.idempotency import http as idempotency
        from service.widgets.models import Widget

        router = APIRouter(prefix="/v1/widgets", tags=["widgets"])


        class WidgetCreate(BaseModel):
            model_config = ConfigDict(extra="forbid")

            name: str = Field(min_length=1, max_length=100)


        @router.post("", status_code=201, responses=idempotency.RESPONSES)
        async def create_widget(payload: WidgetCreate, write: idempotency.IdempotentWriteDep) -> Response:
            """Create a widget. With `Idempotency-Key`, a retry replays the first response."""

            async def create(session: AsyncSession) -> Response:
                widget = Widget(id=uuid7(), name=payload.name, created_at=utcnow())
                session.add(widget)
                await session.flush()
                return JSONResponse({"id": str(widget.id), "name": widget.name}, status_code=201)

            return await write.run(create, body=payload)
    ''',
    "service/widgets/migrations/20261126_widgets_0001_widgets.py": '''
        """widgets

        Revision ID: widgets_0001
        Revises:
        Create Date: 2026-11-26
        """

        from collections.abc import Sequence

        import sqlalchemy as sa
        from alembic import op

        from service.db.types import UTCDateTime

        revision: str = "widgets_0001"
        down_revision: str | None = None
        branch_labels: str | Sequence[str] | None = ("widgets",)
        depends_on: str | Sequence[str] | None = None


        def upgrade() -> None:
            op.create_table(
                "widgets",
                sa.Column("id", sa.Uuid(), nullable=False),
                sa.Column("name", sa.String(length=100), nullable=False),
                sa.Column("created_at", UTCDateTime(), nullable=False),
                sa.PrimaryKeyConstraint("id", name=op.f("pk_widgets")),
            )


        def downgrade() -> None:
            op.drop_table("widgets")
    ''',
    "tests/widgets/__init__.py": "",
    "tests/widgets/test_api.py": '''
        """The widgets API over ASGI, on SQLite and on PostgreSQL."""


        async def test_a_keyed_create_replays_the_first_response(client):
            headers = {"Idempotency-Key": "w-1"}
            first = await client.post("/v1/widgets", json={"name": "gear"}, headers=headers)
            again = await client.post("/v1/widgets", json={"name": "gear"}, headers=headers)
            assert first.status_code == again.status_code == 201, first.text
            assert again.json() == first.json()
            assert again.headers["idempotent-replayed"] == "true"
            other = await client.post("/v1/widgets", json={"name": "cog"}, headers=headers)
            assert other.status_code == 422
    ''',
}

DOMAINS_LINE = 'DOMAINS: tuple[str, ...] = ("notes",)'
NEW_DOMAINS_LINE = 'DOMAINS: tuple[str, ...] = ("widgets",)'


def copy_repository(target: Path) -> None:
    """The files git tracks, as they are on disk now, and mypy's cache (for speed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # skip what the working tree has deleted
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    if (ROOT / ".mypy_cache").is_dir():
        shutil.copytree(ROOT / ".mypy_cache", target / ".mypy_cache")


def swap_domain(repo: Path) -> None:
    """What the README's "Replace the example domain" asks of a fork."""
    shutil.rmtree(repo / "service" / "notes")
    shutil.rmtree(repo / "tests" / "notes")
    for name, content in WIDGETS.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content).lstrip())
    domains = repo / "service" / "domains.py"
    text = domains.read_text()
    assert text.count(DOMAINS_LINE) == 1, "service/domains.py no longer has the line to change"
    domains.write_text(text.replace(DOMAINS_LINE, NEW_DOMAINS_LINE))


def run(repo: Path, *command: str, timeout_s: float = 180, **env: str) -> str:
    """Run one step in the copy; fail with its output. A step that overruns is
    interrupted (SIGINT, so a test session there tears its servers down), then killed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
    process = subprocess.Popen(
        command,
        cwd=repo,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} overran {timeout_s:.0f} s:\n{output[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {process.returncode}:\n{output[-6000:]}")
    return output


def test_a_fork_replaces_notes_with_its_own_domain(postgres: PostgresCluster) -> None:
    repo = Path(tempfile.mkdtemp(prefix="cattle-swap-", dir="/tmp"))
    database = f"swap_{uuid.uuid4().hex[:10]}"
    try:
        copy_repository(repo)
        swap_domain(repo)

        run(repo, str(BIN / "ruff"), "check", ".")
        run(repo, str(BIN / "ruff"), "format", "--check", ".")
        run(repo, str(BIN / "mypy"), "service")
        pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
        if "importlinter" in pyproject.get("tool", {}):
            run(repo, str(BIN / "lint-imports"))

        python = sys.executable
        run(repo, python, "-m", "service", "migrate", CATTLE_DATA_DIR=str(repo / "var"))
        run(repo, python, "-m", "service", "check", CATTLE_DATA_DIR=str(repo / "var"))
        postgres.create_database(database)
        url = postgres.primary_dsn(database).replace("postgresql://", "postgresql+asyncpg://", 1)
        run(repo, python, "-m", "service", "migrate", CATTLE_DATABASE_URL=url)
        run(repo, python, "-m", "service", "check", CATTLE_DATABASE_URL=url)

        # The infrastructure's own tests, and the new domain's keyed write over HTTP.
        tests = [*INFRASTRUCTURE_TESTS, "tests/widgets"]
        output = run(
            repo,
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "2",
            *tests,
            timeout_s=240,
        )
        print(output[-2000:])
    finally:
        postgres.drop_database(database)
        shutil.rmtree(repo, ignore_errors=True)
