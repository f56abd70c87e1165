"""Prometheus for the lab: render its config and targets, run it, ask it.

A real Prometheus (the Debian package) scraping every node's /metrics and
the front's exporter, with the recording rules of deploy/prometheus/rules.yml;
its web UI is the room's live graph. Targets live in files Prometheus
re-reads (file_sd), so `write_targets` after a node comes or goes is enough.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.lab import procs
from deploy.lab.render import DEPLOY_DIR, render

RULES = DEPLOY_DIR / "prometheus" / "rules.yml"
NODE_TARGETS = "nodes.json"
FRONT_TARGETS = "front.json"


class PrometheusError(RuntimeError):
    pass


def find_prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError("prometheus is not installed: apt-get install prometheus")
    return binary


@dataclass(frozen=True)
class Target:
    node: str  # the node id: the `node` label every recording rule groups by
    host: str
    port: int


def write_targets(run_dir: Path, nodes: list[Target], front: tuple[str, int] | None = None) -> None:
    """The scrape targets, written whole and renamed into place (Prometheus
    never reads half a file)."""
    files = {
        NODE_TARGETS: [
            {"targets": [f"{t.host}:{t.port}"], "labels": {"node": t.node}} for t in nodes
        ],
        FRONT_TARGETS: [{"targets": [f"{front[0]}:{front[1]}"]}] if front else [],
    }
    for name, groups in files.items():
        path = run_dir / name
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(groups, indent=1) + "\n")
        partial.replace(path)


def write_config(run_dir: Path, *, scrape_interval_s: float = 1.0) -> Path:
    config = run_dir / "prometheus.yml"
    config.write_text(
        render(
            "prometheus/prometheus.yml.tmpl",
            scrape_interval=f"{scrape_interval_s:g}s",
            scrape_timeout=f"{scrape_interval_s:g}s",
            rules=RULES,
            node_targets=run_dir / NODE_TARGETS,
            front_targets=run_dir / FRONT_TARGETS,
        )
    )
    return config


@dataclass
class Prometheus:
    pid: int
    port: int
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """An instant query's result vector ([] when nothing matches yet)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback)
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> dict[str, float]:
        """The query's values by their `node` label (or the whole expression's, under "")."""
        return {
            sample["metric"].get("node", ""): float(sample["value"][1])
            for sample in self.query(expr)
        }

    def stop(self, timeout_s: float = 10.0) -> None:
        procs.stop(self.pid, str(self.config), timeout_s=timeout_s)


def start(run_dir: Path, *, port: int, timeout_s: float = 30.0) -> Prometheus:
    """Run Prometheus on 127.0.0.1:`port` with the config in `run_dir`, its data there too."""
    config = run_dir / "prometheus.yml"
    if not config.exists():
        raise PrometheusError(f"{config} is missing: write_config first")
    pid = procs.spawn(
        [
            find_prometheus(),
            f"--config.file={config}",
            f"--storage.tsdb.path={run_dir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            # The lab's data is thrown away with the lab: keep it small.
            "--storage.tsdb.retention.time=2h",
        ],
        log=run_dir / "prometheus.log",
    )
    prometheus = Prometheus(pid, port, config)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not procs.is_ours(pid, str(config)):
            log = (run_dir / "prometheus.log").read_text(errors="replace")[-2000:]
            raise PrometheusError(f"prometheus exited while starting:\n{log}")
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return prometheus
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    prometheus.stop()
    raise PrometheusError(f"prometheus did not get ready within {timeout_s:.0f} s")
