"""The import-linter contracts of `make lint` catch the imports they forbid.

Each case copies the code into a scratch folder, adds one import that runs
the wrong way, and runs lint-imports there: a contract that never fails
would let the layers of DESIGN.md drift without anyone noticing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# (file to append to, the import, a line lint-imports must print)
VIOLATIONS = {
    "infrastructure imports the example domain": (
        "service/health/router.py",
        "from service.notes import models",
        "service.health is not allowed to import service.notes",
    ),
    "infrastructure imports a domain no contract names": (
        "service/idempotency/service.py",
        "from service.orders import router",
        "service.idempotency is not allowed to import service.orders",
    ),
    "infrastructure imports the app": (
        "service/server.py",
        "from service.app import create_app",
        "service.server is not allowed to import service.app",
    ),
    "telemetry imports health": (
        "service/telemetry/router.py",
        "from service.health import lifecycle",
        "service.telemetry is not allowed to import service.health",
    ),
    "the read cache imports the bus": (
        "service/cache/store.py",
        "from service.bus import messages",
        "service.cache is not allowed to import service.bus",
    ),
    "the bus imports the read cache": (
        "service/bus/membership.py",
        "from service.cache import store",
        "service.bus is not allowed to import service.cache",
    ),
    "two sibling modules import each other": (
        "service/problems.py",
        "from service import middleware",
        "- .problems -> .middleware (1 import)",
    ),
    "service imports loadtests": (
        "service/config.py",
        "from loadtests import report",
        "service is not allowed to import loadtests",
    ),
}


def _copy(tmp_path: Path) -> Path:
    for name in ("service", "deploy", "loadtests"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # A domain a fork might add: the contracts must cover it without being told.
    orders = tmp_path / "service" / "orders"
    orders.mkdir()
    (orders / "__init__.py").write_text('"""A second domain."""\n')
    (orders / "router.py").write_text("from service.db import base\n")
    return tmp_path


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_a_wrong_way_import_breaks_a_contract(tmp_path: Path, case: str) -> None:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: run `make venv`")
    path, statement, expected = VIOLATIONS[case]
    copy = _copy(tmp_path)
    with (copy / path).open("a") as source:
        source.write(f"\n{statement}  # the deliberate violation\n")
    run = _lint_imports(copy)
    assert run.returncode == 1, run.stdout + run.stderr
    assert expected in run.stdout, run.stdout
