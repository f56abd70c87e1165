"""The node's client-side database bound fits inside the proxy's server timeout.

If HAProxy gave up on a node before the node gave up on its database, a
client would lose its connection on a write that may still commit; the node
must answer 503 first, so its whole database bound must be shorter than
`timeout server` in deploy/haproxy/haproxy.cfg.tmpl.
"""

from __future__ import annotations

import re

from deploy.lab.node import REPO_ROOT
from service.config import Settings

TEMPLATE = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg.tmpl"
_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1e-3}


def haproxy_timeout_s(name: str) -> float:
    """`timeout <name>` of the template, in seconds (HAProxy's default unit is ms)."""
    found = re.findall(rf"^\s*timeout\s+{name}\s+(\d+)([a-z]*)\s*$", TEMPLATE.read_text(), re.M)
    assert len(found) == 1, f"expected one `timeout {name}` in {TEMPLATE}, found {found}"
    value, unit = found[0]
    return int(value) * _UNITS_S[unit]


def test_the_node_answers_before_haproxy_gives_up_on_it() -> None:
    settings = Settings()
    server_s = haproxy_timeout_s("server")
    # Every wait of a request on the database ends within db_request_timeout_s
    # (service/db/engines.py, Database.bounded), then the 503 is written.
    print(
        f"node database bound {settings.db_request_timeout_s} s < HAProxy timeout server {server_s} s"
    )
    assert settings.db_request_timeout_s < server_s


def test_each_client_side_bound_fits_in_the_request_bound() -> None:
    settings = Settings()
    for name in ("db_pool_timeout_s", "db_connect_timeout_s", "db_command_timeout_s"):
        assert getattr(settings, name) < settings.db_request_timeout_s, name
    # The server's own statement timeout fires first on a live server.
    assert settings.db_statement_timeout_s < settings.db_command_timeout_s
