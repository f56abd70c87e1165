"""Nodes that start together on one new SQLite file all get connections.

Switching a new file to WAL takes an exclusive lock, and SQLite answers the
connections that raced for it "database is locked" without waiting, so
`use_wal` retries. The control switches the naive way and shows the race is
real on this machine, so the first test cannot pass by luck alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from service.config import Settings
from service.db import engines

ENGINES = 8  # connections racing for one new file, as nodes of a lab do
TRIALS = 60
CONTROL_TRIALS = 300  # bound on trials until the naive switch loses a race


async def _race(directory: Path) -> list[BaseException]:
    url = f"sqlite+aiosqlite:///{directory}/race.db"
    settings = Settings(database_url=url, data_dir=directory)
    racing = [engines.create_engine(url, settings, role="writer") for _ in range(ENGINES)]

    async def connect(engine: Any) -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    try:
        results = await asyncio.gather(*(connect(e) for e in racing), return_exceptions=True)
    finally:
        for engine in racing:
            await engine.dispose()
    return [r for r in results if isinstance(r, BaseException)]


async def _failures(
    tmp_path: Path, *, trials: int = TRIALS, stop_at_first: bool = False
) -> list[BaseException]:
    failures: list[BaseException] = []
    for trial in range(trials):
        directory = tmp_path / f"t{trial}"
        directory.mkdir()
        failures += await _race(directory)
        if failures and stop_at_first:
            break
    return failures


async def test_nodes_opening_a_new_file_at_once_all_connect(tmp_path: Path) -> None:
    failures = await _failures(tmp_path)
    assert failures == []


async def test_control_the_naive_switch_to_wal_races(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def naive(cursor: Any) -> None:
        cursor.execute("PRAGMA journal_mode=WAL")

    monkeypatch.setattr(engines, "use_wal", naive)
    failures = await _failures(tmp_path, trials=CONTROL_TRIALS, stop_at_first=True)
    assert failures, f"no connection lost the race in {CONTROL_TRIALS} trials"
    assert "locked" in str(failures[0])
