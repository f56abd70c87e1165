"""commit counter

The root of the cache branch (label `cache`): SQLite's commit counter, one
row every write transaction bumps (service/cache/models.py says why).

Revision ID: cache_0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "cache_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("cache",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "commit_counter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commit_counter")),
    )
    op.bulk_insert(table, [{"id": 1, "position": 0}])


def downgrade() -> None:
    op.drop_table("commit_counter")
