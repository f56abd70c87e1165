"""Alembic environment: runs on a connection handed over by `service.db.migrate`.

`python -m service migrate` is the supported entry point: it takes the
migration lock and hands over, in `config.attributes`, the connection and the
metadata of every package that owns tables. This file imports no domain, so
deleting one never breaks it. Authors generate a revision through the same
door (`python -m service revision`), which also hands the metadata over and
then lets this file connect with the URL from the settings.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import Settings

config = context.config
metadata = config.attributes.get("target_metadata")
if metadata is None:
    raise SystemExit(
        "no schema was handed over: run `python -m service migrate` "
        "(or `python -m service revision` to write a migration)"
    )


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    engine = create_async_engine(Settings().effective_database_url)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (--sql) migrations are not supported; run `python -m service migrate`"
    )

connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_standalone())
