"""The image: built from the Dockerfile here, run as a container would run it.

The build (buildah over a debootstrap base, tests/ship/images.py) happens
once per module; the cached base makes it about a minute. Each run starts the
image's own entrypoint as PID 1 of a fresh PID namespace on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab.postgres import PostgresCluster, free_port
from tests.ship import images
from tests.support import require, wait_until

APP_UID = 10001
# Short timings for the drill; the image's defaults are the service's.
DRAIN_DELAY_S = 2.0
SHUTDOWN_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
# docs/operations.md: the node exits by drain + shutdown + close + 1 s.
EXIT_BUDGET_S = DRAIN_DELAY_S + SHUTDOWN_TIMEOUT_S + CLOSE_TIMEOUT_S + 1.0


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    require(os.geteuid() == 0, "building and running the image needs root (buildah, unshare)")
    missing = images.tools_missing()
    require(not missing, f"missing {' '.join(missing)} (make sysdeps installs them)")
    require(images.uv_binary().exists(), "uv not found")
    built = images.build(base=images.base_image(), uv=images.uv_image())
    try:
        yield built.ref
    finally:
        images.remove_image(built.image_id)


@pytest.fixture(scope="module")
def mounted(image: str) -> Iterator[images.Mounted]:
    # One working container for the module's runs (one at a time): with vfs
    # storage each `buildah from` copies the whole image (10-17 s here).
    with images.Mounted(image) as m:
        yield m


class Container:
    """One run of the image, with the helpers the tests need; always cleaned up."""

    def __init__(
        self, mounted: images.Mounted, tmp: Path, argv: list[str] | None = None, **env: str
    ):
        self.port = free_port("127.0.0.1")
        self.config = images.image_config(mounted.ref)
        base_env = {
            "CATTLE_HOST": "127.0.0.1",
            "CATTLE_PORT": str(self.port),
            "CATTLE_BUS": "off",
            "CATTLE_DRAIN_DELAY_S": str(DRAIN_DELAY_S),
            "CATTLE_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
            "CATTLE_CLOSE_TIMEOUT_S": str(CLOSE_TIMEOUT_S),
        }
        self.run = images.Run(
            mounted, self.config, env=base_env | env, argv=argv, log=tmp / "container.log"
        )

    def status(self, path: str) -> int | None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                connection.request("GET", path)
                return connection.getresponse().status
            finally:
                connection.close()
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 60) -> None:
        if wait_until(lambda: self.status("/readyz") == 200, timeout_s=timeout_s) is None:
            raise AssertionError(f"never ready:\n{self.run.output()[-3000:]}")


@pytest.fixture
def start(mounted: images.Mounted, tmp_path: Path) -> Iterator[type[Container]]:
    started: list[Container] = []

    class Started(Container):
        def __init__(self, argv: list[str] | None = None, **env: str) -> None:
            super().__init__(mounted, tmp_path, argv, **env)
            started.append(self)

    yield Started
    for container in started:
        container.run.kill()


def slow_create(port: int, duration_s: float, result: dict[str, object]) -> threading.Thread:
    """POST /v1/notes whose body trickles in over `duration_s` (a request in flight)."""

    def run() -> None:
        body = json.dumps({"title": "slow", "body": "x" * 200}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=duration_s + 30)
        try:
            connection.putrequest("POST", "/v1/notes")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            result["sending"] = time.monotonic()
            for i in range(10):
                connection.send(body[i * len(body) // 10 : (i + 1) * len(body) // 10])
                time.sleep(duration_s / 10)
            result["status"] = connection.getresponse().status
        except OSError as exc:
            result["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_image_runs_as_a_numeric_non_root_user_with_no_uv_and_no_dev_tools(
    image: str, mounted: images.Mounted
) -> None:
    config = images.image_config(image)
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    assert config["Entrypoint"] == ["python3", "-m", "service"]
    assert config["Cmd"] == ["serve"]
    root = mounted.root
    venv = root / "app/.venv"
    assert (venv / "bin/python3").exists()
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "fastapi").is_dir() and (site / "uvicorn").is_dir()
    # No dev dependencies, no uv, no compilers in the final stage.
    for dev in ("pytest", "ruff", "mypy", "locust", "copier"):
        assert not (site / dev).exists(), dev
    for directory in ("usr/local/bin", "usr/bin", "bin", "app/.venv/bin"):
        assert not (root / directory / "uv").exists(), directory
        assert not (root / directory / "gcc").exists(), directory
    # Bytecode compiled at build time (the image is read-only for the node).
    assert list((site / "fastapi").glob("__pycache__/*.pyc"))
    # Only the sources the node needs: no tests, no local database or venv of the checkout.
    assert sorted(p.name for p in (root / "app").iterdir()) == [".venv", "service", "var"]
    assert (root / "app/var").stat().st_uid == APP_UID
    size = images.image_size_bytes(image)
    print(f"image size: {size / 1e6:.0f} MB")


def test_the_node_answers_readyz_as_pid_1_and_drains_on_sigterm_then_exits_0(
    start: type[Container],
) -> None:
    node = start()
    node.wait_ready()
    assert node.run.ns_pid() == 1  # the node itself is the container's PID 1
    assert node.run.process_uids() == (APP_UID, APP_UID)
    assert node.status("/livez") == 200

    in_flight: dict[str, object] = {}
    thread = slow_create(node.port, duration_s=DRAIN_DELAY_S + 1.0, result=in_flight)
    assert wait_until(lambda: "sending" in in_flight, timeout_s=5) is not None
    signalled = time.monotonic()
    node.run.signal(signal.SIGTERM)
    flipped = wait_until(lambda: node.status("/readyz") == 503, timeout_s=2)
    assert flipped is not None and flipped < 1.0, "readiness did not fail at once"
    assert node.status("/livez") == 200  # draining, still alive, still serving
    assert node.status("/v1/notes?limit=1") == 200
    code = node.run.wait(timeout_s=EXIT_BUDGET_S + 5)
    took = time.monotonic() - signalled
    thread.join(10)
    output = node.run.output()
    assert code == 0, f"exit {code}:\n{output[-3000:]}"
    assert took <= EXIT_BUDGET_S, f"took {took:.1f} s, budget {EXIT_BUDGET_S} s"
    assert took >= DRAIN_DELAY_S  # it served for the drain delay first
    assert in_flight.get("status") == 201, in_flight  # the request across SIGTERM completed
    print(f"SIGTERM to exit 0: {took:.2f} s (budget {EXIT_BUDGET_S} s)")


def test_control_a_shell_form_start_never_sees_sigterm(start: type[Container]) -> None:
    # What `CMD python3 -m service serve` (shell form) runs: sh is PID 1, has
    # no SIGTERM handler (so the kernel drops the signal) and does not pass it on.
    node = start(argv=["/bin/sh", "-c", "python3 -m service serve"])
    node.wait_ready()
    assert node.run.ns_pid() == 1
    node.run.signal(signal.SIGTERM)
    assert node.run.wait(timeout_s=EXIT_BUDGET_S + 2) is None, "the shell-form start exited"
    assert node.status("/readyz") == 200, "the node drained: the control is void"


def test_migrate_runs_from_the_same_image_against_postgresql(
    image: str, start: type[Container], postgres: PostgresCluster
) -> None:
    postgres.create_database("ship_image")  # the session's scratch server; gone after it
    url = postgres.primary_dsn("ship_image")
    entrypoint = list(images.image_config(image)["Entrypoint"])  # type: ignore[call-overload]

    def run(command: str) -> tuple[int | None, str]:
        container = start(argv=[*entrypoint, command], CATTLE_DATABASE_URL=url)
        return container.run.wait(timeout_s=60), container.run.output()

    code, output = run("check")
    assert code == 1, output  # empty database: not current
    code, output = run("migrate")
    assert code == 0, output
    assert "schema: empty ->" in output
    code, output = run("check")
    assert code == 0, output
    # A production node from the image (which never migrates) serves that database.
    node = start(
        CATTLE_DATABASE_URL=url,
        CATTLE_ENVIRONMENT="production",
        CATTLE_CURSOR_SECRET="a-private-value-of-32-characters",
    )
    node.wait_ready()
    assert node.status("/v1/notes?limit=1") == 200
