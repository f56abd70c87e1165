"""docs/workshop.md says only what was run: every figure it quotes is the committed
result file's, and every command it shows is one the code accepts (the drills
and the experiments are the ones docs/results/workshop-times.json timed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from deploy.lab import cli, demo, workshop

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "workshop.md"
RESULTS = REPO / "docs" / "results"


def _json(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _at_8(report: Any) -> Any:
    """A scale-out report's N=8 row."""
    return next(row for row in report["rows"] if row["n"] == 8)


def _rates(by_node: dict[str, float]) -> str:
    return ", ".join(f"{node} {rate:.1f}" for node, rate in by_node.items())


def figures() -> dict[str, str]:
    """Each figure the page quotes, as the page writes it, from the result files."""
    times, drill = _json("workshop-times.json"), _json("workshop-drill.json")
    nodeloss, failover, scaleout = (
        _json("nodeloss.json"), _json("failover.json"), _json("scaleout-balanced.json")
    )  # fmt: skip
    fleets_first = _at_8(_json("scaleout-bus-on.json"))
    shipped = _at_8(_json("scaleout-balanced-shipped-timers.json"))
    third = _json("scaleout-balanced-third.json")
    assert third["valid"] and third["agreement"]["agree"]  # as the page says
    third8, shipped_full = _at_8(third), _at_8(_json("scaleout-shipped.json"))
    saturation = {e["event"]: e for e in nodeloss["runs"]["saturation"]["events"]}
    efficiency = {row["n"]: row["efficiency_median"] for row in scaleout["rows"]}
    check = scaleout["usl"]["check"]
    seen = drill["seen_in_view_after_s"]
    return {
        "fresh_live": f"{times['fresh_clone']['seconds_to_live_view']}",
        "second_live": f"{times['second_run']['seconds_to_live_view']}",
        "teardown": f"{times['fresh_clone']['seconds_to_tear_down']}",
        "failover_s": f"{times['experiments']['failover']['seconds']:.0f}",
        "scaleout_min": f"{times['experiments']['scaleout']['seconds'] / 60:.1f}",
        "whole_min": f"{times['seconds_whole_script'] / 60:.1f}",
        "rates_before": _rates(drill["rate_per_node_before"]),
        "rates_after": _rates(drill["rate_per_node_after"]),
        "drain_seen": ", ".join(f"{name} after {s:.1f} s" for name, s in seen.items()),
        "drain_took": f"{drill['drill_took_s']:.1f}",
        "drain_failed": f"{drill['load']['failures']}",
        "drain_requests": f"{drill['load']['requests']}",
        "nodeloss_drain": f"{saturation['drain n1']['failed']} failed of "
        f"{saturation['drain n1']['requests']} requests until the next event",
        "nodeloss_kill": f"{saturation['kill n2']['failed']} failed of "
        f"{saturation['kill n2']['requests']} requests",
        "failover_unavailable": f"{failover['timing']['unavailable_s']:.2f}",
        "failover_lost": f"{len(failover['audit']['lost'])}",
        "failover_duplicated": f"{len(failover['audit']['duplicated'])}",
        "x1": f"{scaleout['x1_rps']:.0f}",
        "efficiency": ", ".join(f"{efficiency[n]:.2f} at N = {n}" for n in (2, 4, 8)),
        "usl_predicted": f"{check['predicted_rps']:.0f}",
        "usl_measured": f"{check['measured_rps']:.0f}",
        "fleets_first": f"E(8) was {fleets_first['efficiency_median']:.2f}",
        "shipped_timers": f"E(8) {shipped['efficiency_median']:.2f} as well",
        "third": f"agrees at every N: E(8) {third8['efficiency_median']:.2f}.",
        "shipped_full": f"a full one {shipped_full['efficiency_median']:.2f}",
    }


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_figure_quoted_is_the_committed_results() -> None:
    page = _flat(PAGE.read_text())
    assert "{{" not in page, "a figure was left unfilled"
    for name, value in figures().items():
        assert _flat(value) in page, f"{name}: {value!r} is not what the page quotes"


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", PAGE.read_text(), re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_every_command_shown_is_accepted_and_was_timed() -> None:
    commands = _commands()
    makefile = (REPO / "Makefile").read_text()
    drills_shown = []
    for argv in commands:
        if argv[0] == "make":
            assert re.search(rf"^{argv[1]}:", makefile, re.MULTILINE), argv
        elif argv[:3] == [".venv/bin/python", "-m", "deploy.lab"]:
            cli.parser().parse_args(argv[3:])  # exits (fails the test) on a bad command
            assert argv[-2:] == ["--run-dir", "run/demo"], argv  # where make demo puts it
            drills_shown.append(" ".join(["deploy.lab", *argv[3:-2]]))
        elif argv[:2] == [".venv/bin/python", "-m"]:
            assert argv in workshop.EXPERIMENTS.values(), f"not the timed command: {argv}"
        else:
            assert argv[0] == "git", argv
    # The drills shown are the ones timed, in the same order.
    assert drills_shown == list(workshop.DRILLS)
    shown = {" ".join(argv) for argv in commands}
    assert all(" ".join(argv) in shown for argv in workshop.EXPERIMENTS.values())


def test_the_demo_variants_named_parse() -> None:
    for inline in re.findall(r"`python -m deploy\.lab\.demo ([^`]*)`", PAGE.read_text()):
        demo.parser().parse_args(shlex.split(inline))


def test_the_picture_is_committed() -> None:
    assert (REPO / "docs" / "workshop-drill.png").stat().st_size > 10_000
