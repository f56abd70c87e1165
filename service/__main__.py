"""Command line: `python -m service [serve|migrate|check]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError

from service import NAME
from service.config import Settings, UnsupportedDatabase, env_var, redact_url


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = env_var("_".join(str(p) for p in error["loc"]))
            lines.append(f"  {name}: {error['msg']}" if error["loc"] else f"  {error['msg']}")
        raise SystemExit(
            f"{NAME}: invalid configuration:\n" + "\n".join(lines) + "\n"
            "fix the environment variables above (see README.md, Configuration)"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve the API (the default)")
    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    direction = migrate.add_mutually_exclusive_group()
    direction.add_argument(
        "--revision", default="heads", help="upgrade to REVISION (default: every branch's head)"
    )
    direction.add_argument(
        "--downgrade", metavar="REVISION", help="downgrade to REVISION (base: empty)"
    )
    commands.add_parser("check", help="exit 0 if the schema is current, 1 if not")
    revision = commands.add_parser(
        "revision", help="write the next migration of a package (service/<PACKAGE>/migrations)"
    )
    revision.add_argument("package", help="a domain or infrastructure package owning tables")
    revision.add_argument("-m", "--message", required=True, help="what the migration does")
    revision.add_argument(
        "--autogenerate",
        action="store_true",
        help="draft it from the models against the database of the settings (at heads)",
    )
    return parser


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service import domains
    from service.db import migrate

    downgrade = args.downgrade is not None
    before, after = await migrate.migrate(
        settings.effective_database_url,
        domains.schema(),
        revision=args.downgrade if downgrade else args.revision,
        downgrade=downgrade,
    )
    print(f"schema: {before or 'empty'} -> {after or 'empty'}")
    return 0


def _revision(args: argparse.Namespace) -> int:
    from service import domains
    from service.db import migrate

    path = migrate.new_revision(
        domains.schema(), args.package, message=args.message, autogenerate=args.autogenerate
    )
    print(f"wrote {path}")
    return 0


async def _check(settings: Settings) -> int:
    from service import domains
    from service.db import migrate
    from service.db.engines import create_engine

    engine = create_engine(settings.effective_database_url, settings, role="writer")
    try:
        state = await migrate.schema_state(engine, domains.schema())
    finally:
        await engine.dispose()
    print(f"schema: at {state.current or 'empty'}, head is {state.head}")
    return 0 if state.is_current else 1


async def _preflight(settings: Settings) -> None:
    from service.db.engines import Database
    from service.lifespan import ensure_schema

    database = Database(settings)
    try:
        await ensure_schema(settings, database)
    finally:
        await database.dispose()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _load_settings()
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(settings, args))
        if args.command == "check":
            return asyncio.run(_check(settings))
        if args.command == "revision":
            return _revision(args)
        from service.app import create_app
        from service.lifespan import SchemaNotCurrent
        from service.server import serve
        from service.telemetry.logs import configure_logging

        # JSON logs from the first line on: the preflight logs too.
        configure_logging(settings)
        try:
            asyncio.run(_preflight(settings))
        except SchemaNotCurrent as exc:
            print(f"{NAME}: refusing to serve: {exc}", file=sys.stderr)
            return 3
        serve(create_app(settings), settings)
        return 0
    except UnsupportedDatabase as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"{NAME}: cannot reach the database at "
            f"{redact_url(settings.effective_database_url)}: {exc}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
