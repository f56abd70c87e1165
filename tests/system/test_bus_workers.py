"""Several uvicorn workers in one node: the bus refuses to start, saying what to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.lab.node import REPO_ROOT
from deploy.lab.postgres import free_port
from tests.support import wait_until

pytestmark = pytest.mark.cluster


def test_uvicorn_workers_get_a_clear_refusal_from_the_bus(tmp_path: Path) -> None:
    log_path = tmp_path / "workers.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
    env |= {"CATTLE_DATA_DIR": str(tmp_path / "data"), "CATTLE_BUS_BIND": "tcp://127.0.0.1:*"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
             "--workers", "2", "--port", str(free_port())],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        refused = wait_until(
            lambda: "one process per node" in log_path.read_text(errors="replace"),
            timeout_s=60,
            interval_s=0.1,
        )
        assert refused is not None, log_path.read_text(errors="replace")[-3000:]
        text = log_path.read_text(errors="replace")
        assert "python -m service serve" in text and "CATTLE_BUS=off" in text
    finally:
        # The supervisor and the workers it started: the group this test made.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
