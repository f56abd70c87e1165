"""Fixtures for lifecycle tests: real nodes as subprocesses on loopback, and a
PostgreSQL cluster of their own whose primary the tests may stop and start.

Every node a test starts is killed (by the PID it was started with) when the
test ends, pass or fail, and its log is printed so a failure can be read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from deploy.lab.node import Node
from deploy.lab.postgres import PostgresCluster
from tests.conftest import postgres_cluster

StartNode = Callable[..., Node]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    """start_node(env=None, name="node") -> a started Node with its own SQLite data dir."""
    nodes: list[Node] = []

    def start(env: Mapping[str, str] | None = None, *, name: str = "node") -> Node:
        data_dir = tmp_path / name
        node = Node(
            tmp_path / f"{name}.log",
            name=name,
            env={"CATTLE_DATA_DIR": str(data_dir), **(env or {})},
        )
        nodes.append(node)
        return node.start(timeout_s=60)

    yield start
    for node in nodes:
        node.kill()
        print(f"===== log of {node.name} (pid {node.pid}, exit {node.returncode})")
        print(node.log_tail(80))


@pytest.fixture(scope="module")
def outage_postgres() -> Iterator[PostgresCluster]:
    """A primary and one streaming replica for lifecycle tests alone: tests stop members."""
    with postgres_cluster("cattle-lc-pg-", replicas=1) as cluster:
        yield cluster
