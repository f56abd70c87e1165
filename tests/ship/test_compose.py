"""compose.yaml: valid by the compose-spec schema, its references resolve, its
HAProxy configuration renders and passes `haproxy -c`, and it agrees with the service.

Not run: podman is installed here, but `podman run` fails in this sandbox
(crun: setrlimit RLIMIT_NOFILE / RLIMIT_NPROC: Operation not permitted), so
compose.yaml is checked offline instead (docs/deploy.md says so).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.lab.render import render
from tests.ship import manifests
from tests.ship.images import REPO
from tests.support import require


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [manifests.tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def reference_problems(compose: dict[str, Any]) -> list[str]:
    """depends_on, volumes and configs that name nothing (the schema cannot see these)."""
    problems = []
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            if dependency not in services:
                problems.append(f"{name}: depends_on {dependency!r} is no service")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")) and source not in compose.get("volumes", {}):
                problems.append(f"{name}: volume {source!r} is not declared")
            if source.startswith(".") and not (REPO / source).exists():
                problems.append(f"{name}: {source} does not exist")
        for config in service.get("configs", []):
            if config["source"] not in compose.get("configs", {}):
                problems.append(f"{name}: config {config['source']!r} is not declared")
        if "image" not in service and "build" not in service:
            problems.append(f"{name}: neither image nor build")
    return problems


def test_compose_passes_the_compose_spec_schema() -> None:
    done = schema_check(REPO / "compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_control_a_misspelled_key_fails_the_schema(tmp_path: Path) -> None:
    planted = tmp_path / "compose.yaml"
    planted.write_text(
        (REPO / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace:")
    )
    assert schema_check(planted).returncode != 0


def test_every_reference_resolves() -> None:
    assert reference_problems(manifests.compose_file()) == []


def test_control_a_dangling_depends_on_is_caught() -> None:
    compose = manifests.compose_file()
    compose["services"]["api"]["depends_on"]["migrat"] = {"condition": "service_started"}
    assert reference_problems(compose)


def test_the_shape_the_issue_asks_for() -> None:
    services = manifests.compose_file()["services"]
    api = services["api"]
    assert api["deploy"]["replicas"] >= 2
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["build"] == "." and services["migrate"]["image"] == api["image"]
    for db in ("db-primary", "db-replica"):
        assert "pg_isready" in services[db]["healthcheck"]["test"]
    assert "pg_basebackup" in services["db-replica"]["command"][0]
    assert services["haproxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["locust"]["profiles"] == ["load"]
    # Only loopback on the host.
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_compose_agrees_with_the_service_settings() -> None:
    assert manifests.compose_problems(manifests.compose_file(), manifests.setting_defaults()) == []


def test_the_haproxy_configuration_renders_and_haproxy_accepts_it(tmp_path: Path) -> None:
    require(shutil.which("haproxy") is not None, "haproxy not installed (make sysdeps)")
    step = manifests.compose_file()["services"]["haproxy-config"]
    words = step["command"][0].split(">")[0].split()
    assert words[:3] == ["python3", "-m", "deploy.lab.render"]
    values = dict(w.split("=", 1) for w in words[4:] if not w.startswith('"servers'))
    values["servers"] = step["environment"]["SERVERS"]
    values["run_dir"] = str(tmp_path)  # the stats socket's directory
    config = tmp_path / "haproxy.cfg"
    config.write_text(render(words[3], **values))
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    agent_port = manifests.compose_file()["services"]["api"]["environment"]["CATTLE_AGENT_PORT"]
    assert f"agent-port {agent_port}" in config.read_text()
    assert "uri /readyz" in config.read_text()


@pytest.mark.parametrize("path", ["compose.yaml"])
def test_compose_is_plain_yaml(path: str) -> None:
    assert isinstance(yaml.safe_load((REPO / path).read_text()), dict)
