"""The one writer of result files: OUT.json (the figures) and OUT.md (them, for reading)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.harness.lock import exclusive

Markdown = Callable[[dict[str, Any]], str]


def how_measured(command: str) -> list[str]:
    """The heading every report's method section starts with, and its command."""
    return ["## How it was measured", "", "```", command, "```", ""]


def write_report(report: dict[str, Any], out: Path, markdown: Markdown) -> None:
    """OUT.json (the figures) and OUT.md (them, rendered for reading)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def report_main(
    name: str,
    out: Path,
    render: Path | None,
    measure: Callable[[], dict[str, Any]],
    markdown: Markdown,
) -> dict[str, Any] | None:
    """What a benchmark's main does with its report.

    With `render` (a JSON report), only OUT.md is written anew from it, and
    None returned. Otherwise `measure()` runs under the machine lock and its
    report goes to OUT.json and OUT.md, and is returned.
    """
    if render is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(markdown(json.loads(render.read_text())))
        return None
    with exclusive(name):
        report = measure()
    write_report(report, out, markdown)
    return report
