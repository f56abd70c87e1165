"""Read what ships: the rendered kustomize overlays, compose.yaml and the Dockerfile,
and the one place their numbers must come from (service/config.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from service import ENV_PREFIX
from service.config import Settings
from tests.ship.images import REPO
from tests.support import require

K8S = REPO / "deploy/k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SCHEMAS = K8S / "schemas"
# Custom resources and the schema of ours that checks each (kubernetes-validate has none).
CRD_SCHEMAS = {
    ("postgresql.cnpg.io/v1", "Cluster"): SCHEMAS / "cnpg-cluster.json",
    ("metallb.io/v1beta1", "IPAddressPool"): SCHEMAS / "metallb-ipaddresspool.json",
    ("metallb.io/v1beta2", "BGPPeer"): SCHEMAS / "metallb-bgppeer.json",
    ("metallb.io/v1beta1", "BGPAdvertisement"): SCHEMAS / "metallb-bgpadvertisement.json",
}
# The oldest Kubernetes the manifests support: preStop `sleep` is on by default from 1.30.
KUBERNETES_VERSION = "1.30.0"
# docs/operations.md: the node exits by drain + shutdown + close + this margin.
EXIT_MARGIN_S = 1.0


def tool(name: str) -> str:
    found = shutil.which(name) or str(REPO / ".venv/bin" / name)
    require(Path(found).exists(), f"{name} not installed (the dev group)")
    return found


def kustomize(directory: Path) -> str:
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def setting_defaults() -> dict[str, Any]:
    """Every setting's default, as service/config.py declares it (no environment read)."""
    return {
        name: field.get_default(call_default_factory=False)
        for name, field in Settings.model_fields.items()
    }


def effective_settings(env: dict[str, str], defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings a node gets from `env` (its CATTLE_* variables) over `defaults`."""
    values = dict(defaults)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key.removeprefix(ENV_PREFIX).lower()
            if name in values:
                values[name] = value
    return values


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The literal env values of a container (valueFrom entries are secrets, not timings)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def drain_budget_s(values: dict[str, Any]) -> float:
    return (
        float(values["drain_delay_s"])
        + float(values["shutdown_timeout_s"])
        + float(values["close_timeout_s"])
        + EXIT_MARGIN_S
    )


def deployment_problems(docs: list[dict[str, Any]], defaults: dict[str, Any]) -> list[str]:
    """What in the rendered Deployment disagrees with the service's settings."""
    problems = []
    deployment = find(docs, "Deployment", "cattle")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "cattle")
    values = effective_settings(container_env(container), defaults)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if ports.get("http") != int(values["port"]):
        problems.append(f"containerPort http {ports.get('http')} != port {values['port']}")
    bus_port = re.fullmatch(r"tcp://[^:]+:(\d+)", str(values["bus_bind"]))
    if not bus_port or int(bus_port.group(1)) != ports.get("bus"):
        problems.append(f"bus port {ports.get('bus')} != {values['bus_bind']}")
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + drain_budget_s(values)
    grace = pod["terminationGracePeriodSeconds"]
    if grace < needed:
        problems.append(
            f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain "
            f"{values['drain_delay_s']} + shutdown {values['shutdown_timeout_s']} + close "
            f"{values['close_timeout_s']} + {EXIT_MARGIN_S} = {needed}"
        )
    return problems


def dockerfile_problems(text: str, defaults: dict[str, Any]) -> list[str]:
    problems = []
    exposed = re.findall(r"^EXPOSE\s+(\d+)", text, re.M)
    if exposed != [str(defaults["port"])]:
        problems.append(f"EXPOSE {exposed} != port {defaults['port']}")
    port_env = re.findall(rf"\b{ENV_PREFIX}PORT=(\d+)", text)
    if port_env and port_env != [str(defaults["port"])]:
        problems.append(f"{ENV_PREFIX}PORT={port_env} != port {defaults['port']}")
    return problems


def compose_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return loaded


def parse_duration_s(text: str) -> float:
    """A compose duration (`45s`, `1m30s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def compose_problems(compose: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """What in compose.yaml's API service disagrees with the service's settings."""
    problems = []
    api = compose["services"]["api"]
    environment = api.get("environment", {})
    values = effective_settings({k: str(v) for k, v in environment.items()}, defaults)
    stop = parse_duration_s(api["stop_grace_period"])
    if stop <= drain_budget_s(values):
        problems.append(f"stop_grace_period {stop} s <= drain budget {drain_budget_s(values)} s")
    test = " ".join(api["healthcheck"]["test"])
    if f":{values['port']}/readyz" not in test:
        problems.append(f"healthcheck {test!r} does not probe /readyz on {values['port']}")
    return problems
