"""The hardening results: every hostile input and fault a test tries, what the
node answered, the longest wait, whether the node stayed healthy, and the
audit, as one table (docs/results/hardening.{json,md}, shown in docs/hardening.md).

Tests call `record(...)` once per case. In a normal run each record is held
against the committed result: a case the table lacks, or one whose answer,
health or audit now differs, fails the test that tried it, so the table can
never say less or other than the suite does. Waits vary from run to run and
are not compared. With HARDENING_WRITE=1 (`make hardening-report`) nothing is
compared; the run's cases are written as the new result at the session's end.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests import report as reports

REPO = Path(__file__).resolve().parents[1]
RESULT_JSON = REPO / "docs/results/hardening.json"
RESULT_MD = REPO / "docs/results/hardening.md"
WRITING = os.environ.get("HARDENING_WRITE", "").strip().lower() in ("1", "true", "yes")

# The answers of the run in progress, by key (HARDENING_WRITE=1 only).
_recorded: dict[str, Case] = {}


@dataclass(frozen=True)
class Case:
    group: str  # "bad input", "exposed node", "database fault", ...
    tried: str  # the input or the fault
    backend: str  # "sqlite", "postgres", or "-" when it does not matter
    answer: str  # e.g. "400 malformed-json", "503 database-unavailable + Retry-After"
    wait_s: float  # the longest a client waited for the answer
    healthy: bool  # the node answered /readyz (or /livez) 200 afterwards
    audit: str  # what was checked in the database or on the node afterwards

    @property
    def key(self) -> str:
        return f"{self.group} | {self.tried} | {self.backend}"


def answer_of(status: int, content_type: str | None = None, body: bytes | str = b"") -> str:
    """`status`, with the problem type's last part when the answer is a problem."""
    if content_type == "application/problem+json":
        kind = str(json.loads(body).get("type", ""))
        return f"{status} {kind.rsplit(':', 1)[-1] if kind.startswith('urn:') else kind}"
    return str(status)


def committed() -> dict[str, dict[str, Any]]:
    if not RESULT_JSON.exists():
        return {}
    cases = json.loads(RESULT_JSON.read_text())["cases"]
    return {Case(**case).key: case for case in cases}


def record(
    group: str,
    tried: str,
    *,
    answer: str,
    wait_s: float,
    healthy: bool,
    audit: str = "-",
    backend: str = "-",
) -> None:
    case = Case(group, tried, backend, answer, round(wait_s, 3), healthy, audit)
    if WRITING:
        earlier = _recorded.get(case.key)
        if earlier is not None:  # the same case tried again: keep the longest wait
            case = Case(**{**asdict(case), "wait_s": max(earlier.wait_s, case.wait_s)})
        _recorded[case.key] = case
        return
    found = committed().get(case.key)
    hint = "run `make hardening-report` and commit docs/results/hardening.*"
    assert found is not None, f"docs/results/hardening.json lacks the case {case.key!r}; {hint}"
    for name in ("answer", "healthy", "audit"):
        assert found[name] == getattr(case, name), (
            f"{case.key}: the committed table says {name} {found[name]!r}, "
            f"the run {getattr(case, name)!r}; {hint}"
        )


def render(result: dict[str, Any]) -> str:
    """The markdown table of a result document (docs/results/hardening.md)."""
    lines = [
        reports.measured(result),
        "",
        f"{len(result['cases'])} cases, written by `make hardening-report`, "
        f"which runs `{result['command']}`.",
        "",
        "| group | input or fault | backend | answer | longest wait | node healthy after | audit |",
        "| --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for case in result["cases"]:
        tried = case["tried"].replace("|", "\\|")
        lines.append(
            f"| {case['group']} | {tried} | {case['backend']} | {case['answer']} "
            f"| {case['wait_s']:.2f} s | {'yes' if case['healthy'] else 'NO'} | {case['audit']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(exitstatus: int) -> None:
    """Write the run's cases as the result (called at the session's end).

    Only from a run that passed: a failed test has recorded the cases before
    its failure and none after, and a table of half a run would hide the rest.
    """
    if not WRITING or not _recorded:
        return
    if exitstatus != 0:
        print(f"\nhardening: the run failed; {RESULT_JSON.name} left as it was")
        return
    cases = sorted(_recorded.values(), key=lambda c: (c.group, c.tried, c.backend))
    # The one metadata layout of every result file (loadtests/report.py).
    command = shlex.join(["python", "-m", "pytest", *sys.argv[1:]])
    result = reports.stamped(command, {"cases": [asdict(case) for case in cases]})
    RESULT_JSON.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    RESULT_MD.write_text(render(result))
