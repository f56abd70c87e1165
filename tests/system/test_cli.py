"""`python -m service`: clear errors for bad settings and unmigrated schemas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bad_setting_names_the_variable_and_the_fix():
    result = run("check", CATTLE_PORT="eighty")
    assert result.returncode == 1
    assert "CATTLE_PORT" in result.stderr and "valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_unsupported_database_url_is_explained():
    result = run("check", CATTLE_DATABASE_URL="mysql://localhost/db")
    assert result.returncode == 1
    assert "CATTLE_DATABASE_URL" in result.stderr and "postgresql" in result.stderr
    assert "Traceback" not in result.stderr


def test_production_refuses_to_serve_an_unmigrated_database(tmp_path):
    result = run(
        "serve",
        CATTLE_ENVIRONMENT="production",
        CATTLE_CURSOR_SECRET="a-private-secret-of-length",
        CATTLE_DATA_DIR=str(tmp_path),
        CATTLE_PORT="0",
    )
    assert result.returncode == 3
    assert "refusing to serve" in result.stderr
    assert "python -m service migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_then_check(tmp_path):
    env = {"CATTLE_DATA_DIR": str(tmp_path)}
    assert run("check", **env).returncode == 1
    migrated = run("migrate", **env)
    assert migrated.returncode == 0 and "-> " in migrated.stdout
    checked = run("check", **env)
    assert checked.returncode == 0 and "head is" in checked.stdout


def test_an_unreachable_database_is_named_without_its_password(tmp_path):
    # Port 9 on loopback (discard) refuses: nothing listens there in a test.
    url = "postgresql://app:s3cret-pw@127.0.0.1:9/app"
    for command in ("migrate", "check", "serve"):
        result = run(command, CATTLE_DATABASE_URL=url, CATTLE_DATA_DIR=str(tmp_path), timeout=60)
        assert result.returncode != 0, command
        assert "s3cret-pw" not in result.stdout + result.stderr, (command, result.stderr)
        assert "app:***@127.0.0.1:9" in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr, (command, result.stderr)
