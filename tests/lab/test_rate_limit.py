"""HAProxy's per-client rate limit, through a real HAProxy in front of a real node.

The lab's default limit is far above any load it generates; here a lab is
started with a low one, so the requests past it are answered 429 as a
problem document by HAProxy, while the same client under the limit (the
control) is served.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from deploy.lab.cluster import Lab, LabOptions
from tests.conftest import scratch_dir
from tests.support import require

pytestmark = [pytest.mark.cluster]

LIMIT = 20  # requests per client address in any 10 s


@pytest.fixture(scope="module")
def limited_lab() -> Iterator[Lab]:
    require(
        shutil.which("haproxy") is not None or os.path.exists("/usr/sbin/haproxy"),
        "haproxy is not installed",
    )
    base = scratch_dir("cattle-ratelimit-")
    lab = Lab(base / "run")
    try:
        lab.up(LabOptions(nodes=1, backend="sqlite", rate_limit_per_10s=LIMIT))
        yield lab
    finally:
        lab.down()  # stops every process the lab started, by the PIDs it recorded
        shutil.rmtree(base, ignore_errors=True)


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def test_a_client_past_the_limit_gets_a_429_problem(limited_lab: Lab) -> None:
    front = limited_lab.load()["front"]
    statuses = []
    refused: tuple[dict[str, str], bytes] | None = None
    for _ in range(LIMIT + 10):
        status, headers, body = _get(front + "/livez")
        statuses.append(status)
        if status == 429 and refused is None:
            refused = headers, body
    print(f"{LIMIT + 10} requests at a limit of {LIMIT}: {statuses}")
    # The control: every request within the limit was served.
    assert statuses[:LIMIT] == [200] * LIMIT
    # Past it, every one is refused.
    assert statuses[LIMIT:] == [429] * 10
    assert refused is not None
    headers, body = refused
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["content-type"] == "application/problem+json"
    assert int(lowered["retry-after"]) > 0
    document = json.loads(body)
    assert document["type"] == "urn:cattle:problem:too-many-requests"
    assert document["status"] == 429
    assert str(LIMIT) in document["detail"]
