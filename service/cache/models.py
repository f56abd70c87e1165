"""SQLite's commit counter: the position a cache entry and a consistency token carry there.

PostgreSQL has a WAL position for this; SQLite has none a reader can ask
for, so every write transaction bumps this one row (service/db/engines.py)
and its value commits with the write. Every process sharing the file sees
the same order. On PostgreSQL the row exists and stays at 0.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer
from sqlalchemy.orm import Mapped, mapped_column

from service.db import consistency
from service.db.base import Base


class CommitCounter(Base):
    __tablename__ = consistency.COMMIT_COUNTER

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    position: Mapped[int] = mapped_column(BigInteger)
