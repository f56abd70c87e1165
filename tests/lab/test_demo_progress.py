"""Bringing a lab up shows its steps: `python -m deploy.lab up` and `make demo` share
one function, a bar with time spent and left on a terminal, a plain line per step
anywhere else. A stand-in lab tells the steps here; the real ones are seen by
tests/lab/test_demo.py (a terminal) and test_demo_anycast.py (a pipe)."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from deploy.lab import cli
from deploy.lab.cluster import LabOptions, up_steps


class _StandInLab:
    """Tells `progress` the steps `up_steps` counts, as Lab.up does, and starts nothing."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.options: LabOptions | None = None

    def up(self, options: LabOptions, *, progress: Any = None) -> dict[str, Any]:
        self.options = options
        for i in range(up_steps(options)):
            progress(f"step named {i + 1}")
            time.sleep(0.02)
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "options": {"backend": "sqlite"},
            "front": "http://127.0.0.1:1",
            "database": {"primary": "sqlite"},
            "nodes": [],
        }


def test_up_prints_a_line_per_step_when_not_on_a_terminal(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "Lab", _StandInLab)
    assert cli.main(["up", "--run-dir", str(tmp_path), "--prometheus"]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"^up: step (\d) of (\d), step named (\d) \(([\d.]+) s in\)$", out, re.M)
    assert [(k, n, name) for k, n, name, _ in steps] == [(f"{k}", "6", f"{k}") for k in range(1, 7)]
    assert [float(s[3]) for s in steps] == sorted(float(s[3]) for s in steps)
    assert re.search(r"^up: lab up after [\d.]+ s$", out, re.M), out
    assert out.index("up: lab up after") < out.index(f"lab {tmp_path}")  # then the status
    assert "━" not in out  # no bar drawn into a pipe


def test_the_bar_shows_steps_done_time_spent_and_left_on_a_terminal(tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=140, color_system=None)
    options = LabOptions(nodes=3, prometheus=False)
    state = cli.bring_up(_StandInLab(tmp_path), options, console)  # type: ignore[arg-type]
    assert state["front"] == "http://127.0.0.1:1"
    final = screen.getvalue().rsplit("\r", 1)[-1]
    assert "lab up" in final and "5/5" in final, final
    assert re.search(r"in 0:00:\d\d left about", final), final
    assert "up: step" not in screen.getvalue()
