"""deploy/k8s: every overlay renders, validates strictly, and agrees with the service."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.health.router import router as health_router
from tests.ship import manifests
from tests.ship.manifests import CRD_SCHEMAS, K8S, OVERLAYS, REPO, documents, find


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: documents(manifests.kustomize(K8S / "overlays" / o)) for o in OVERLAYS}


def kubernetes_validate(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[int, list[str]]:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    done = subprocess.run(
        [
            manifests.tool("kubernetes-validate"),
            "--strict",
            "-k",
            manifests.KUBERNETES_VERSION,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()


def crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_there_are_a_dev_and_a_production_overlay() -> None:
    assert OVERLAYS == ["dev", "production"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = rendered[overlay]
    code, lines = kubernetes_validate(docs, tmp_path)
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    builtin = len(docs) - len(custom)
    assert code == 0, "\n".join(lines)
    assert sum(" passed for resource " in line for line in lines) == builtin, "\n".join(lines)
    unknown = [line for line in lines if "find schema" in line]
    assert len(unknown) == len(custom), "\n".join(unknown)  # only the CRDs lack a schema ...
    for doc in custom:  # ... and ours check them
        assert crd_errors(doc) == [], doc["metadata"]["name"]


def test_control_a_typo_in_a_builtin_object_fails_strict_validation(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = json.loads(json.dumps(rendered["production"]))  # the fixture stays intact
    deployment = find(docs, "Deployment", "cattle")
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    code, lines = kubernetes_validate(docs, tmp_path)
    assert code != 0, "\n".join(lines)


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("Cluster", ("spec", "postgresql", "synchronous"), ("number", "numbr")),
        ("BGPPeer", ("spec",), ("peerASN", "peerAsn")),
        ("IPAddressPool", ("spec",), ("addresses", "adresses")),
        ("BGPAdvertisement", ("spec",), ("ipAddressPools", "ipAddressPool")),
    ],
)
def test_control_a_typo_in_a_custom_resource_fails_its_schema(
    rendered: dict[str, list[dict[str, Any]]],
    kind: str,
    path: tuple[str, ...],
    typo: tuple[str, str],
) -> None:
    doc = json.loads(json.dumps(find(rendered["production"], kind)))
    node = doc
    for key in path:
        node = node[key]
    node[typo[1]] = node.pop(typo[0])
    assert crd_errors(doc), f"{kind}: {typo[1]} passed"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_agrees_with_the_service_settings(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    assert manifests.deployment_problems(docs, manifests.setting_defaults()) == []
    container = find(docs, "Deployment", "cattle")["spec"]["template"]["spec"]["containers"][0]
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes == {
        "startupProbe": ("/startupz", "http"),
        "readinessProbe": ("/readyz", "http"),
        "livenessProbe": ("/livez", "http"),
    }
    # The paths are the service's own routes.
    app_paths = {getattr(r, "path", None) for r in health_router.routes}
    assert {path for path, _ in probes.values()} <= app_paths


@pytest.mark.parametrize(
    ("setting", "increase"), [("shutdown_timeout_s", 40.0), ("drain_delay_s", 30.0), ("port", 1)]
)
def test_control_a_changed_default_the_manifests_do_not_follow_fails(
    setting: str, increase: float, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    defaults = manifests.setting_defaults()
    defaults[setting] += increase
    problems = manifests.deployment_problems(rendered["production"], defaults)
    problems += manifests.dockerfile_problems((REPO / "Dockerfile").read_text(), defaults)
    problems += manifests.compose_problems(manifests.compose_file(), defaults)
    assert problems, f"{setting} = {defaults[setting]} went unnoticed"


def test_the_dockerfile_agrees_with_the_service_settings() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert manifests.dockerfile_problems(text, manifests.setting_defaults()) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_fleet_objects_fit_together(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "cattle")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    pdb = find(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"]) and pdb["spec"]["maxUnavailable"] == 1
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == "cattle"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    service = find(docs, "Service", "cattle")
    assert selects(service["spec"]["selector"])
    peers = find(docs, "Service", "cattle-peers")
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
    assert selects(peers["spec"]["selector"])
    env = manifests.container_env(container)
    bus_port = next(p["port"] for p in peers["spec"]["ports"] if p["name"] == "bus")
    assert env["CATTLE_BUS_PEERS"] == f"dns://cattle-peers:{bus_port}"
    # Non-root, read-only, no capabilities; liveness never on readiness's path.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert (
        container["livenessProbe"]["httpGet"]["path"]
        != container["readinessProbe"]["httpGet"]["path"]
    )
    assert (
        find(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )
    # The migration is a Job of the same image, never part of the node's start.
    job = find(docs, "Job", "cattle-migrate")
    job_container = job["spec"]["template"]["spec"]["containers"][0]
    assert job_container["image"] == container["image"] and job_container["args"] == ["migrate"]
    assert container["args"] == ["serve"] and not pod.get("initContainers")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cloudnativepg_writer_on_rw_readers_on_ro(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    cluster = find(docs, "Cluster")
    name = cluster["metadata"]["name"]
    assert cluster["spec"]["instances"] == 3
    assert cluster["spec"]["postgresql"]["synchronous"] == {
        "method": "any",
        "number": 1,
        "dataDurability": "required",
    }
    for kind, cname in (("Deployment", "cattle"), ("Job", "cattle-migrate")):
        container = find(docs, kind, cname)["spec"]["template"]["spec"]["containers"][0]
        names = [e["name"] for e in container["env"]]
        assert names.count("CATTLE_DATABASE_URL") == 1, kind
        env = manifests.container_env(container)
        assert f"@{name}-rw:5432/" in env["CATTLE_DATABASE_URL"]
        assert f"@{name}-ro:5432/" in env["CATTLE_READ_DATABASE_URLS"]
        # $(VAR) expands only from variables listed earlier.
        assert names.index("DB_PASSWORD") < names.index("CATTLE_DATABASE_URL")


def test_production_announces_the_vip_by_metallb_bgp(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["production"]
    service = find(docs, "Service", "cattle")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    pool = find(docs, "IPAddressPool")
    advertisement = find(docs, "BGPAdvertisement")
    peer = find(docs, "BGPPeer")
    assert service["metadata"]["annotations"]["metallb.io/address-pool"] == pool["metadata"]["name"]
    assert advertisement["spec"]["ipAddressPools"] == [pool["metadata"]["name"]]
    assert advertisement["spec"]["peers"] == [peer["metadata"]["name"]]
    for doc in (pool, advertisement, peer):
        assert doc["metadata"]["namespace"] == "metallb-system"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] == "Deployment"} == {"cattle"}


def test_dev_runs_a_distributed_locust_on_the_project_users(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["dev"]
    master = find(docs, "Deployment", "cattle-locust-master")["spec"]["template"]["spec"]
    worker = find(docs, "Deployment", "cattle-locust-worker")["spec"]["template"]["spec"]
    assert "--master" in master["containers"][0]["args"]
    assert "cattle-locust-master" in worker["containers"][0]["args"]
    locustfile = master["containers"][0]["args"][1]
    assert Path(locustfile).name == "notes.py"
    assert (REPO / "loadtests/clients" / Path(locustfile).name).exists()
