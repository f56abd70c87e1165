"""The API against its own OpenAPI description: schemathesis, all checks, on a
real node over loopback on SQLite and on PostgreSQL.

Real uvicorn processes rather than ASGI: what a client meets includes what
the server adds (Content-Length, HEAD without a body, connection handling),
and a conformance check should see that too.

The run is bounded (examples per operation and a time budget) and seeded,
with deterministic generation, so a failure replays and `make test` stays
short; `CATTLE_SCHEMATHESIS_EXAMPLES` widens it by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from deploy.lab.postgres import PostgresCluster
from tests.conftest import TEMPLATE_DB
from tests.system.conftest import StartNode

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = os.environ.get("CATTLE_SCHEMATHESIS_EXAMPLES", "30")
CONFIG = Path(__file__).with_name("schemathesis.toml")
# Checks a case labelled valid against the spec's header schemas (see there why).
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
SEED = "18"
BUDGET_S = 15


def run_schemathesis(base_url: str, report: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(CONFIG),
            "run",
            f"{base_url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            EXAMPLES,
            "--seed",
            SEED,
            "--generation-deterministic",
            "--workers",
            "1",
            "--max-time",
            str(BUDGET_S),
            "--request-timeout",
            "10",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(report),
        ],
        # schemathesis keeps state in .schemathesis/ of its working directory.
        cwd=report.parent,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        capture_output=True,
        text=True,
        timeout=BUDGET_S * 3,
        check=False,
    )


def assert_conforms(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20_000:]
    assert "No issues found" in output or "passed" in output, output[-5_000:]


def test_the_api_conforms_to_its_description_on_sqlite(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    assert_conforms(run_schemathesis(f"http://{node.host}:{node.port}", tmp_path / "report"))


@pytest.mark.postgres
def test_the_api_conforms_to_its_description_on_postgres(
    start_node: StartNode, postgres: PostgresCluster, tmp_path: Path
) -> None:
    name = f"st_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name, template=TEMPLATE_DB)
    try:
        node = start_node({"CATTLE_DATABASE_URL": postgres.primary_dsn(name)})
        assert_conforms(run_schemathesis(f"http://{node.host}:{node.port}", tmp_path / "report"))
    finally:
        postgres.drop_database(name)
