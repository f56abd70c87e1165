"""The lab's PostgreSQL helper starts a real primary with streaming hot standbys."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.lab.postgres import PostgresCluster, PostgresError, PostgresNotInstalled, find_bindir
from tests.support import wait_until

pytestmark = pytest.mark.postgres


def _require_postgres() -> None:
    try:
        find_bindir()
    except PostgresNotInstalled as e:
        # In CI a missing server is a broken image, not a reason to go green.
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


def _new_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # As root the server runs as the postgres user, which cannot enter pytest's
    # /tmp/pytest-of-root (mode 0700); a fresh directory directly under /tmp always works.
    base = tmp_path_factory.mktemp("pg")
    if base.is_relative_to("/tmp") and os.geteuid() != 0:
        return base
    return Path(tempfile.mkdtemp(prefix="cattle-pg-", dir="/tmp"))


def _eventually(check: Callable[[], bool], timeout_s: float = 10, what: str = "") -> None:
    if wait_until(check, timeout_s=timeout_s, interval_s=0.1) is None:
        pytest.fail(f"not within {timeout_s}s: {what}")


def _answer(
    cluster: PostgresCluster, sql: str, member: str, dbname: str = "postgres"
) -> str | None:
    # While a replica is still starting or replaying, "no such table" means "not yet".
    try:
        return cluster.psql(sql, member=member, dbname=dbname)
    except PostgresError:
        return None


def _alive(pid: int) -> bool:
    # A zombie (nobody reaped it) has released its ports and memory: it counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            return False
    with socket.socket() as s:
        # SO_REUSEADDR as PostgreSQL itself binds, so TIME_WAIT leftovers do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    _require_postgres()
    base = _new_base_dir(tmp_path_factory)
    pg = PostgresCluster(base, replicas=2)
    pg.start()
    yield pg
    pg.remove()
    shutil.rmtree(base, ignore_errors=True)


def test_replicas_are_hot_standbys_of_the_primary(cluster: PostgresCluster) -> None:
    assert cluster.psql("SELECT pg_is_in_recovery()") == "f"
    for replica in cluster.replicas:
        assert cluster.psql("SELECT pg_is_in_recovery()", member=replica.name) == "t"
    streaming = cluster.psql(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1"
    )
    assert streaming.splitlines() == [r.name for r in cluster.replicas]


def test_row_written_on_primary_arrives_on_every_replica(cluster: PostgresCluster) -> None:
    cluster.psql("CREATE TABLE arrivals (id int PRIMARY KEY, note text)")
    cluster.psql("INSERT INTO arrivals VALUES (1, 'hello')")
    for replica in cluster.replicas:
        name = replica.name
        _eventually(
            lambda: _answer(cluster, "SELECT note FROM arrivals", name) == "hello",  # noqa: B023
            what=f"row on {name}",
        )
    with pytest.raises(PostgresError, match="read-only transaction"):
        cluster.psql("INSERT INTO arrivals VALUES (2, 'no')", member=cluster.replicas[0].name)


def test_created_database_is_usable_on_replicas_and_dropped(cluster: PostgresCluster) -> None:
    cluster.create_database("cattle_scratch")
    cluster.psql("CREATE TABLE t (id int)", dbname="cattle_scratch")
    replica = cluster.replicas[0].name
    _eventually(
        lambda: _answer(cluster, "SELECT count(*) FROM t", replica, "cattle_scratch") == "0",
        what="database on the replica",
    )
    cluster.drop_database("cattle_scratch")
    assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'cattle_scratch'") == "0"


@pytest.mark.parametrize(("name", "mode"), [("replica1", "fast"), ("replica2", "kill")])
def test_stopped_replica_catches_up_after_restart(
    cluster: PostgresCluster, name: str, mode: str
) -> None:
    table = f"missed_{mode}"
    cluster.psql(f"CREATE TABLE {table} (id int)")
    cluster.stop_member(name, mode=mode)
    assert cluster.member(name).pid is None
    with pytest.raises(PostgresError):
        cluster.psql("SELECT 1", member=name)
    # Written while the replica is down: its slot keeps the WAL on the primary.
    cluster.psql(f"INSERT INTO {table} SELECT generate_series(1, 1000)")

    cluster.start_member(name)

    count_sql = f"SELECT count(*) FROM {table}"  # noqa: S608 - table name is ours
    _eventually(lambda: _answer(cluster, count_sql, name) == "1000", what=f"{name} catching up")
    assert cluster.psql("SELECT pg_is_in_recovery()", member=name) == "t"


def test_stop_leaves_no_postmaster_and_frees_ports(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _require_postgres()
    base = _new_base_dir(tmp_path_factory)
    pg = PostgresCluster(base, replicas=2)
    try:
        pg.start()
        started = {m.name: m.pid for m in pg.members}
        for m in pg.members:
            assert m.pid is not None
            assert _alive(m.pid)
            # The recorded PID really is this member's postmaster.
            assert str(m.data_dir) in Path(f"/proc/{m.pid}/cmdline").read_text()

        doc = pg.to_json()
        assert doc["primary"] == f"postgresql://postgres@127.0.0.1:{pg.primary.port}/postgres"
        assert doc["replicas"] == pg.replica_dsns()
        assert [m["pid"] for m in doc["members"]] == list(started.values())

        # Another process (the lab CLI's `down`) stops it knowing only dir and ports.
        ports = [m.port for m in pg.members]
        PostgresCluster(base, replicas=2, ports=ports).stop_member("replica2")
        assert not _alive(started["replica2"] or 0)
        pg.stop()
        pg.stop()  # idempotent

        for name, pid in started.items():
            assert pid is not None
            assert not _alive(pid), f"{name} postmaster {pid} still alive"
        for m in pg.members:
            assert m.pid is None
            assert _port_free(pg.host, m.port), f"{m.name} port {m.port} still taken"
        assert pg.to_json()["members"][0]["pid"] is None
    finally:
        pg.remove()
        shutil.rmtree(base, ignore_errors=True)
    assert not any(base.glob("*"))
