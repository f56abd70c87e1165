"""Progress lines of a long experiment: which run of how many, time in, time left.

An experiment made of runs whose length its plan states (each run's load
lasts so long) prints a line as each run begins and as each planned event
fires, in the style of the scale-out experiment's lines:

    nodeloss: run 1 of 3 (saturation), 0.0 min in, about 4.5 min left

(An experiment of one run says only its name: `failover (...)`.)

Time left is the plan's duration of every run not yet finished, scaled by
how much longer than planned the finished runs took (a lab's bring-up, the
notes seeded, the audit come on top of a run's load), less the time the
current run has had so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Runs:
    name: str  # the experiment, the lines' prefix
    planned_s: Sequence[float]  # each run's length by the plan, in order
    labels: Sequence[str] = ()  # each run's name, in the lines
    clock: Callable[[], float] = time.monotonic
    echo: Callable[[str], None] = _say
    began: float = field(init=False)
    current: int = field(init=False, default=-1)  # index of the run begun last
    current_began: float = field(init=False, default=0.0)
    took_s: list[float] = field(init=False, default_factory=list)  # of the finished runs

    def __post_init__(self) -> None:
        self.began = self.clock()

    def left_s(self) -> float:
        """Seconds until the last run ends, by the plan scaled by the runs finished so far."""
        done = len(self.took_s)
        planned_done = sum(self.planned_s[:done])
        scale = sum(self.took_s) / planned_done if done and planned_done else 1.0
        left = sum(self.planned_s[done:]) * scale
        if self.current >= done:  # a run under way: its time so far is not left
            left -= min(self.clock() - self.current_began, self.planned_s[done] * scale)
        return max(0.0, left)

    def _where(self) -> str:
        line = self.name
        if len(self.planned_s) > 1:
            line += f": run {self.current + 1} of {len(self.planned_s)}"
        if self.current < len(self.labels):
            line += f" ({self.labels[self.current]})"
        return line

    def say(self, what: str) -> None:
        """Before the first run (a cluster coming up): what it is doing, and the time in."""
        self.echo(f"{self.name}: {what}, {(self.clock() - self.began) / 60:.1f} min in")

    def _times(self) -> str:
        return (
            f"{(self.clock() - self.began) / 60:.1f} min in, "
            f"about {self.left_s() / 60:.1f} min left"
        )

    def begin(self, what: str = "") -> None:
        """The next run begins: say which, and the time in and left."""
        self.current = len(self.took_s)
        self.current_began = self.clock()
        self.echo(f"{self._where()}{f', {what}' if what else ''}, {self._times()}")

    def note(self, what: str) -> None:
        """Something happened in the run under way (a planned event fired)."""
        self.echo(f"{self._where()}: {what}, {self._times()}")

    def end(self) -> None:
        """The run under way is finished."""
        self.took_s.append(self.clock() - self.current_began)
