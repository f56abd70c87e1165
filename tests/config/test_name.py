"""The service's name lives in one line: a renamed copy follows it everywhere.

A fork renames the service by changing `NAME` in service/__init__.py. The
test does that to a copy of the package and runs it in a fresh interpreter,
so every module computes its constants from the new name at import, as a
fork's would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import service
from service import config, problems
from service.db import migrate

SOURCE = Path(service.__file__).parent

# Printed as JSON by the renamed copy: everything the name should reach.
PROBE = """
import json, os
import pydantic
from service import advisory_lock_id
from service.config import Settings, env_var
from service.problems import problem_type
from service.db.migrate import MIGRATION_LOCK_ID
from service.app import create_app

refusal = ""
try:
    Settings(environment="production")
except pydantic.ValidationError as exc:
    refusal = str(exc)
settings = Settings()
print(json.dumps({
    "port": settings.port,
    "env_var": env_var("admin_token"),
    "refusal": refusal,
    "database": settings.effective_database_url,
    "urn": problem_type("not-found"),
    "migrate_lock": MIGRATION_LOCK_ID,
    "derived_lock": advisory_lock_id("migrate"),
    "title": create_app(settings).title,
}))
"""


def _renamed_copy(tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "service"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "__init__.py"
    text = init.read_text()
    assert text.count('NAME = "cattle"\n') == 1, "NAME is no longer set on one line"
    init.write_text(text.replace('NAME = "cattle"\n', f'NAME = "{name}"\n'))
    return tmp_path


def test_a_renamed_service_derives_its_env_urns_and_locks_from_the_name(tmp_path: Path) -> None:
    root = _renamed_copy(tmp_path, "herd")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATTLE_", "HERD_"))}
    env |= {
        "PYTHONPATH": str(root),
        "HERD_PORT": "9123",
        "CATTLE_PORT": "9999",  # the old prefix no longer reaches the settings
        "HERD_DATA_DIR": str(tmp_path / "data"),
        "HERD_TELEMETRY_ENABLED": "false",
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])

    assert seen["port"] == 9123
    assert seen["env_var"] == "HERD_ADMIN_TOKEN"
    assert "HERD_CURSOR_SECRET must be set" in seen["refusal"]
    assert seen["database"].endswith("/data/herd.db")
    assert seen["urn"] == "urn:herd:problem:not-found"
    assert seen["title"] == "herd"
    assert seen["migrate_lock"] == seen["derived_lock"]
    # A different name takes a different lock: two services can share a database.
    assert seen["migrate_lock"] != migrate.MIGRATION_LOCK_ID


def test_this_build_uses_its_own_name() -> None:
    # The control for the test above: the unrenamed package gives the names
    # operators and the docs use today.
    assert config.Settings.model_config["env_prefix"] == "CATTLE_"
    assert config.env_var("admin_token") == "CATTLE_ADMIN_TOKEN"
    assert problems.problem_type("validation") == "urn:cattle:problem:validation"
    assert service.advisory_lock_id("migrate") == migrate.MIGRATION_LOCK_ID


def test_advisory_lock_ids_fit_postgres_integers() -> None:
    for purpose in ("migrate", "idempotency-keys"):
        assert -(2**63) <= service.advisory_lock_id(purpose) < 2**63
        assert -(2**31) <= service.advisory_lock_id(purpose, bits=32) < 2**31
    assert service.advisory_lock_id("migrate") != service.advisory_lock_id("idempotency-keys")
