"""The one settings object: every knob of a node, read from CATTLE_* variables (ENV_PREFIX)."""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import ENV_PREFIX, NAME

# Shipped so `make run` works with no configuration; refused in production.
DEV_CURSOR_SECRET = f"{NAME}-development-cursor-secret"


def env_var(field: str) -> str:
    """The environment variable that sets one field: `port` -> `<PREFIX>PORT`.

    Messages name the variable an operator sets, which follows the prefix.
    """
    return ENV_PREFIX + field.upper()


class Environment(StrEnum):
    development = "development"
    production = "production"


class UnsupportedDatabase(ValueError):
    """A database URL whose scheme the service has no driver for."""


# The URLs a node accepts, as every refusal lists them.
SUPPORTED_DATABASE_URLS = (
    "sqlite:///path/to/file.db or sqlite+aiosqlite:///path/to/file.db (embedded SQLite); "
    "postgresql://, postgres:// or postgresql+asyncpg://user@host:5432/dbname "
    "(PostgreSQL through asyncpg, several hosts as host1:5432,host2:5432)"
)


def redact_url(url: str) -> str:
    """`url` fit for a message or a log: any password replaced by `***`.

    Works on what a person may have typed too (no scheme, several hosts), so
    it never fails and never lets a password through.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"  # not a URL: it may be anything, a password included
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    path = re.sub(r"(?i)(password=)[^&]*", r"\1***", path)  # libpq takes it as a parameter too
    return f"{scheme}{sep}{userinfo}{at}{hosts}{slash}{path}"


def normalize_database_url(url: str) -> str:
    """Map the URLs people write to the async drivers the service ships.

    `postgresql://` and `postgres://` get asyncpg; `sqlite:///` gets aiosqlite.
    Those two drivers are the only ones in the lock, so any other driver is
    refused here rather than failing at the first connection.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UnsupportedDatabase(
            f"the value is not a URL (no scheme://); use {SUPPORTED_DATABASE_URLS}"
        )
    base, _, driver = scheme.partition("+")
    if base in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        return f"postgresql+asyncpg://{_multi_host_as_query(rest)}"
    if base == "sqlite" and driver in ("", "aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise UnsupportedDatabase(
        f"unsupported database URL scheme {scheme!r}; use {SUPPORTED_DATABASE_URLS}"
    )


def _multi_host_as_query(rest: str) -> str:
    """`u@h1:5432,h2:5432/db?x=y` (libpq style) -> `u@/db?x=y&host=h1:5432&host=h2:5432`.

    SQLAlchemy takes several hosts (for failover with target_session_attrs)
    only as repeated `host` query parameters.
    """
    userinfo, at, hostpart = rest.rpartition("@")
    hosts, _, tail = hostpart.partition("/")
    if "," not in hosts:
        return rest
    database, _, query = tail.partition("?")
    params = [query] if query else []
    params += [f"host={host}" for host in hosts.split(",") if host]
    return f"{userinfo}{at}/{database}?{'&'.join(params)}"


def _default_node_id() -> str:
    return socket.gethostname()


class Settings(BaseSettings):
    """Everything a node needs, validated at start so a bad value fails fast."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    environment: Environment = Environment.development
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    node_id: str = Field(default_factory=_default_node_id, min_length=1, max_length=128)
    data_dir: Path = Path("var")
    database_url: str | None = None
    db_pool_size: int = Field(default=10, ge=1, le=200)
    # Client-side bounds on every database call, so a frozen or half-open
    # server costs a request a 503 within db_request_timeout_s, never a hang.
    # service/db/engines.py applies all of them. The server-side statement
    # timeout cannot fire in a frozen server; these are the ones that can.
    # Waiting for a pooled connection: past it the pool is exhausted (logged,
    # counted, and the node's agent weight lowered) and the request is 503.
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    # Opening a connection (TCP and authentication): a server that cannot
    # do that within seconds will not serve the request in time either.
    db_connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Server-side statement_timeout (and SQLite's busy timeout): a slow query
    # is cancelled cleanly by the server itself.
    db_statement_timeout_s: float = Field(default=10.0, gt=0)
    # asyncpg's command_timeout, per statement: above the statement timeout so
    # a live server's clean cancellation comes first; this one is for a server
    # that cannot answer at all.
    db_command_timeout_s: float = Field(default=11.0, gt=0, le=300)
    # The whole of one request's database work (checkout, connect, every
    # statement, commit). A connection that overran it is discarded, never
    # reused. Must stay below the proxy's `timeout server`
    # (deploy/haproxy/haproxy.cfg.tmpl, checked by tests/db/test_timeouts.py),
    # so a client never loses its connection on a write that then commits.
    db_request_timeout_s: float = Field(default=20.0, gt=0, le=300)
    # Streaming replicas for reads, comma separated; writes always go to database_url.
    # NoDecode: a plain comma separated string, not JSON.
    read_database_urls: Annotated[list[str], NoDecode] = []
    replica_max_lag_s: float = Field(default=2.0, gt=0)
    replica_check_interval_s: float = Field(default=0.5, gt=0)

    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    # A node must survive clients that reach it directly (anycast, no proxy in
    # front); service/server.py enforces these per connection. The head limits
    # match HAProxy's defaults (a 16 KiB buffer, 101 headers), so a request
    # gets the same answer with or without the proxy; 431 past them.
    max_header_bytes: int = Field(default=16384, ge=1024, le=1024 * 1024)
    max_header_count: int = Field(default=100, ge=16, le=10_000)
    # 408 past these. The head comes in one or two packets from any real
    # client, so seconds are generous; the body bound lets a max_body_bytes
    # body arrive over a slow mobile link. HAProxy buffers whole requests
    # (`timeout http-request`), so behind it neither is ever reached.
    header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # The staged close after answering a request not read to its end (413,
    # 431, 408): how long and how much of the rest the node reads and drops so
    # the client reads the answer instead of a reset. Past either, it closes.
    linger_timeout_s: float = Field(default=5.0, ge=0, le=60)
    linger_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0, le=1024 * 1024 * 1024)
    page_limit_default: int = Field(default=20, ge=1)
    page_limit_max: int = Field(default=100, ge=1, le=1000)
    cursor_secret: SecretStr = SecretStr(DEV_CURSOR_SECRET)

    idempotency_ttl_s: float = Field(default=24 * 3600, gt=0)
    idempotency_lease_s: float = Field(default=10.0, gt=0)
    # How long a request waits for a key another request holds before 409.
    idempotency_wait_s: float = Field(default=1.0, ge=0, le=30)
    idempotency_purge_interval_s: float = Field(default=300.0, gt=0)

    # Health, lifecycle and drain (docs/operations.md has the timings).
    agent_port: int = Field(default=0, ge=0, le=65535)  # HAProxy agent-check; 0 = off
    drain_file: Path | None = None  # drained while this file exists
    admin_token: SecretStr | None = None  # enables POST /admin/drain, /admin/undrain
    drain_delay_s: float = Field(default=5.0, ge=0, le=3600)
    shutdown_timeout_s: float = Field(default=20.0, gt=0, le=3600)
    close_timeout_s: float = Field(default=5.0, gt=0, le=300)
    health_interval_s: float = Field(default=1.0, ge=0.05, le=60)
    health_timeout_s: float = Field(default=1.0, gt=0, le=60)
    health_db_latency_warn_ms: float = Field(default=250.0, gt=0)
    health_loop_lag_warn_ms: float = Field(default=250.0, gt=0)
    # Rounds in a row a check must warn before the node turns DEGRADED (a failing one: at once).
    health_warn_rounds: int = Field(default=3, ge=1, le=100)
    max_in_flight: int = Field(default=100, ge=1, le=100_000)  # in-flight for agent weight 1 %

    # The node bus (service/bus/): ZeroMQ PUB/SUB between nodes, no broker.
    # CATTLE_BUS=off turns it off. Peers: comma separated tcp://host:port
    # and/or dns://name:port (resolved by the node, re-resolved on an interval).
    bus: bool = True
    bus_bind: str = "tcp://127.0.0.1:*"
    bus_peers: Annotated[list[str], NoDecode] = []
    bus_heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    bus_suspect_after_s: float = Field(default=3.0, gt=0, le=600)
    bus_dead_after_s: float = Field(default=10.0, gt=0, le=3600)
    bus_dns_interval_s: float = Field(default=5.0, gt=0, le=3600)
    bus_dns_timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Per connection, in messages: past it PUB drops (receivers see the gap)
    # rather than buffer without bound for a peer that does not read.
    bus_hwm: int = Field(default=10_000, ge=1, le=10_000_000)
    # How long queued messages (the last `bye` included) may hold the close.
    bus_linger_s: float = Field(default=0.5, ge=0, le=60)

    @field_validator("bus_bind")
    @classmethod
    def _check_bus_bind(cls, value: str) -> str:
        if not re.fullmatch(r"tcp://(\*|\[[0-9a-fA-F:.]+\]|[^:/\s]+):(\*|\d{1,5})", value):
            raise ValueError(
                "give tcp://<address>:<port> (e.g. tcp://0.0.0.0:7400), or port * for any free port"
            )
        return value

    @field_validator("bus_peers")
    @classmethod
    def _check_bus_peers(cls, value: list[str]) -> list[str]:
        for peer in value:
            if not re.fullmatch(r"(tcp|dns)://(\[[0-9a-fA-F:.]+\]|[^:/\s\[\]]+):\d{1,5}", peer):
                raise ValueError(
                    f"{peer!r} is not a peer: give tcp://host:port or dns://name:port, "
                    "comma separated"
                )
        return value

    @model_validator(mode="after")
    def _check_bus_timings(self) -> Settings:
        if self.bus_dead_after_s <= self.bus_suspect_after_s:
            raise ValueError(
                f"{env_var('bus_dead_after_s')} must exceed {env_var('bus_suspect_after_s')}"
            )
        if self.bus_suspect_after_s < 2 * self.bus_heartbeat_interval_s:
            raise ValueError(
                f"{env_var('bus_suspect_after_s')} must be at least twice "
                f"{env_var('bus_heartbeat_interval_s')}: one late heartbeat is not a failure"
            )
        return self

    # The per-node read cache (service/cache/). CATTLE_CACHE=off turns it off.
    cache: bool = True
    cache_max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    cache_ttl_s: float = Field(default=1.0, gt=0, le=3600)

    # Traces and metrics (OTel SDK). Exporters, sampling and resource follow the
    # standard OTEL_* variables; these only switch and bound what the service owns.
    telemetry_enabled: bool = True
    telemetry_shutdown_timeout_s: float = Field(default=2.0, gt=0, le=30)
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("drain_file", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # CATTLE_ADMIN_TOKEN= (empty) in an env file means "off", not "the empty token".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        return None if value in (None, "") else normalize_database_url(value)

    @field_validator("bus_peers", mode="before")
    @classmethod
    def _split_bus_peers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("read_database_urls", mode="before")
    @classmethod
    def _check_read_database_urls(cls, value: object) -> object:
        if isinstance(value, str):
            # Split only at commas that start a new URL: a multi-host URL
            # (host1:5432,host2:5432) keeps its own commas.
            value = [
                p.strip() for p in re.split(r",\s*(?=[a-z][a-z0-9+.-]*://)", value) if p.strip()
            ]
        if isinstance(value, list):
            return [normalize_database_url(str(url)) for url in value]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment is Environment.production:
            secret = self.cursor_secret.get_secret_value()
            if secret == DEV_CURSOR_SECRET or len(secret) < 16:
                raise ValueError(
                    f"{env_var('cursor_secret')} must be set to a private value of at least "
                    "16 characters in production (the same on every node)"
                )
        if self.read_database_urls and not self.effective_database_url.startswith("postgresql"):
            raise ValueError(
                f"{env_var('read_database_urls')} needs a PostgreSQL "
                f"{env_var('database_url')}: replicas "
                "are PostgreSQL streaming standbys of that primary"
            )
        if self.page_limit_default > self.page_limit_max:
            raise ValueError(
                f"{env_var('page_limit_default')} must not exceed {env_var('page_limit_max')}"
            )
        self._check_health_settings()
        return self

    def _check_health_settings(self) -> None:
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is not None and self.environment is Environment.production and len(token) < 16:
            raise ValueError(
                f"{env_var('admin_token')} must be at least 16 characters in production "
                "(or unset, which removes the admin endpoints)"
            )
        if token is not None and any(c.isspace() for c in token):
            raise ValueError(
                f"{env_var('admin_token')} must not contain whitespace (a bearer token)"
            )
        if self.agent_port and self.agent_port == self.port:
            raise ValueError(f"{env_var('agent_port')} must differ from {env_var('port')}")
        if self.health_timeout_s > self.health_interval_s * 5:
            raise ValueError(
                f"{env_var('health_timeout_s')} must not exceed "
                f"5 x {env_var('health_interval_s')}: "
                "a check that may run that long leaves readiness stale"
            )

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the embedded SQLite file under data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{NAME}.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")
