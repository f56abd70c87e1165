"""The load's phases: which share of the users sends when (loadtests/harness/locust_run.py)."""

from __future__ import annotations

import pytest

from loadtests.harness import locust_run
from loadtests.harness.locust_run import Phases


def test_only_the_active_shares_send_and_the_others_wait_for_their_turn(monkeypatch):
    phases = Phases.parse(4, "0:1,10:4,20:1")
    assert [phases.active(s, 5.0) for s in range(4)] == [True, False, False, False]
    assert [phases.active(s, 15.0) for s in range(4)] == [True, True, True, True]
    assert [phases.active(s, 25.0) for s in range(4)] == [True, False, False, False]
    now = [phases.started + 4.0]
    monkeypatch.setattr(locust_run.time, "time", lambda: now[0])
    assert phases.wait_s(0) == 0.0
    assert phases.wait_s(3) == pytest.approx(6.0)  # until 10 s
    now[0] = phases.started + 21.0
    assert phases.wait_s(2) == 86400.0  # never again in this load


@pytest.mark.parametrize(
    ("shares", "text", "said"),
    [
        (4, "1:1", "first phase at 0 s"),
        (4, "0:5", "between 0 and 4"),
        (4, "0-1", "SECONDS:ACTIVE_SHARES"),
    ],
)
def test_bad_phases_say_what_is_wrong(shares, text, said):
    with pytest.raises(ValueError, match=said):
        Phases.parse(shares, text)


def test_a_share_splits_by_weight_like_the_whole():
    # (The user classes themselves import locust, which patches the process: a
    # child's business, so plain keys stand in for them here.)
    assert locust_run.user_counts({"reader": 90, "writer": 5, "lister": 5}, 20) == {
        "reader": 18,
        "writer": 1,
        "lister": 1,
    }
