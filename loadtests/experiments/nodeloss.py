"""Node-loss experiment: steady load on N nodes while nodes leave and come back.

Runs on a lab of N=4 CPU-capped nodes behind HAProxy: at saturation, then at
about 70% of capacity, then at saturation again until there are --repeats
saturation runs (interleaved with the steady one, so the machine's drift
spreads over the repeats); then a control run, at saturation on a lab whose
HAProxy does not retry, which shows what the retries protect against
(failures are expected there). During each, on a schedule: drain a node
(SIGTERM: its drain sequence), restart it, kill -9 another, restart it, and
(with --backend patroni) kill the database primary. Afterwards every
acknowledged create is audited against what the service stores.

Writes docs/results/nodeloss.{md,json,png}: a timeline of requests/s stacked
by node, failures/s and p50/p99 with the events marked; failed requests per
event; capacity after a loss against (N-1)/N, per run and over the repeats at
saturation (median and 95% interval); time to recover; the audit.

    python -m loadtests.experiments.nodeloss            # the full run (five runs of 90 s of load)
    python -m loadtests.experiments.nodeloss --smoke    # seconds: checks the code, not the machine

With --front anycast the same drill runs on the lab's anycast front (BIRD
with ECMP, an ExaBGP sidecar per node, SQLite), the load generator in the
lab's client namespace; its control is the same drill with the router's
connection pinning off. Writes docs/results/nodeloss-anycast.*.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deploy.lab import anycast, haproxy, netns
from deploy.lab.cluster import Lab, LabOptions
from loadtests import report as reports
from loadtests.experiments.audit import audit
from loadtests.harness import analysis
from loadtests.harness.loadrun import LoadResult, run_load
from loadtests.harness.paired import t_interval
from loadtests.harness.progress import Runs

RESULTS = reports.RESULTS / "nodeloss"
ANYCAST_RESULTS = reports.RESULTS / "nodeloss-anycast"


@dataclass(frozen=True)
class Plan:
    nodes: int = 4
    cpu: float = 0.15
    backend: str = "postgres"
    users: int = 24
    duration_s: float = 90.0
    steady_fraction: float = 0.7
    # (seconds into the load, event, node): the node-loss drill. Windows are
    # long (12-15 s) because a loaded 2-core machine swings ±25% second to second.
    schedule: tuple[tuple[float, str, str], ...] = (
        (20.0, "drain", "n1"),
        (35.0, "restart", "n1"),
        (45.0, "kill", "n2"),
        (60.0, "restart", "n2"),
        (75.0, "kill-primary", "db"),
    )
    baseline_s: tuple[float, float] = (5.0, 20.0)
    drain_delay_s: float = 2.0
    # The same drill at saturation with HAProxy's retries off (anycast: pinning
    # off), beside the protected runs.
    control: bool = True
    front: str = "haproxy"
    # Notes created before each run's load, for the readers to read.
    seed_notes: int = 200
    # Saturation runs on the one lab (the first, the steady run, then the rest):
    # capacity after a loss is stated over them, not from one run.
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, not {self.repeats}")


SMOKE = Plan(
    nodes=2,
    cpu=0.3,
    backend="sqlite",
    users=6,
    duration_s=13.0,
    # With two nodes, the second may only go once the first is back in rotation.
    schedule=(
        (2.0, "drain", "n1"),
        (3.0, "restart", "n1"),
        (8.5, "kill", "n2"),
        (10.0, "restart", "n2"),
    ),
    baseline_s=(0.5, 2.0),
    drain_delay_s=0.5,
    seed_notes=20,  # 200 take seconds per run through the smoke's small nodes
    repeats=1,
)


def _action(
    lab: Lab,
    nodes: list[dict[str, Any]],
    event: str,
    target: str,
    out_of_rotation_s: dict[str, float | None],
) -> Callable[[], Any]:
    def refresh() -> None:
        # The sampler reads these dicts: point them at the restarted process.
        fresh = {n["id"]: n for n in lab.load()["nodes"]}
        for node in nodes:
            node.update(fresh[node["id"]])

    def leave(how: Callable[[str], Any]) -> None:
        # Watched from the moment of the signal, beside it: a drain blocks
        # until the node has exited, long after HAProxy stopped using it.
        state = lab.load()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            if state.get("anycast"):
                watch = pool.submit(_seconds_until_withdrawn, state["anycast"], target)
            else:
                socket_path = Path(state["haproxy"]["socket"])
                watch = pool.submit(haproxy.seconds_until_out, socket_path, target)
            how(target)
            out_of_rotation_s[f"{event} {target}"] = watch.result()

    def act() -> None:
        if event == "drain":
            leave(lab.drain)
        elif event == "kill":
            leave(lab.kill)
        elif event == "restart":
            lab.restart(target)
            refresh()
        elif event == "kill-primary":
            from deploy.lab.patroni import PatroniCluster

            cluster = PatroniCluster.from_json(lab.load()["database"])
            cluster.kill_postgres(cluster.leader())
        else:
            raise ValueError(f"unknown event {event!r}")

    return act


def _seconds_until_withdrawn(
    plan: dict[str, Any], node: str, timeout_s: float = 5.0
) -> float | None:
    """Seconds from now until the anycast router sends new flows to other nodes, not `node`.

    A read with no next hop at all (no route, or a failed read) does not count.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        hops = anycast.next_hop_nodes(plan)
        if hops and node not in hops:
            return time.monotonic() - started
        time.sleep(0.01)
    return None


@contextlib.contextmanager
def _client_side(lab: Lab) -> Iterator[None]:
    """The load generator's side of the lab: the client namespace on the anycast
    front (the locust child and the audit inherit it), this one otherwise."""
    client = (lab.load().get("anycast") or {}).get("client_netns")
    with netns.entered(client) if client else contextlib.nullcontext():
        yield


def _said(runs: Runs | None, at: float, label: str, act: Callable[[], Any]) -> Callable[[], Any]:
    """`act`, first lines to `runs` (a progress line) as the event fires."""
    if runs is None:
        return act

    def said() -> Any:
        runs.note(f"+{at:g} s {label}")
        return act()

    return said


def drill(
    lab: Lab, plan: Plan, *, rate_per_user: float | None, runs: Runs | None = None
) -> tuple[LoadResult, dict[str, float | None]]:
    """The load with the plan's events; also how long each leaving node took to leave rotation.

    Each event, as it fires, is lines to `runs` (a progress line)."""
    state = lab.load()
    nodes = [dict(n) for n in state["nodes"]]
    out_of_rotation_s: dict[str, float | None] = {}
    events = [
        (at, f"{event} {target}", _action(lab, nodes, event, target, out_of_rotation_s))
        for at, event, target in plan.schedule
        if event != "kill-primary" or plan.backend == "patroni"
    ]
    schedule = [(at, label, _said(runs, at, label, act)) for at, label, act in events]
    with _client_side(lab):
        result = run_load(
            state["front"],
            nodes,
            users=plan.users,
            duration_s=plan.duration_s,
            rate_per_user=rate_per_user,
            seed_notes=plan.seed_notes,
            schedule=schedule,
        )
    return result, out_of_rotation_s


def analyse(
    result: LoadResult,
    plan: Plan,
    audit_result: dict[str, int],
    out_of_rotation_s: dict[str, float | None],
) -> dict[str, Any]:
    timeline = analysis.per_second(result)
    b0, b1 = plan.baseline_s
    baseline = statistics.fmean(s["ok"] for s in timeline[int(b0) : int(b1)]) if timeline else 0.0
    events = []
    marks = [e["t"] - result.started for e in result.events] + [result.ended - result.started]
    for i, event in enumerate(result.events):
        start, end = event["t"] - result.started, marks[i + 1]
        rows = analysis.window(result, start, end)
        figures = analysis.summarize(result, rows, max(end - start, 1e-9))
        entry: dict[str, Any] = {
            "event": event["label"],
            "at_s": round(start, 2),
            "took_s": round(event["done_t"] - event["t"], 2),
            "error": event["error"],
            "requests": figures["requests"],
            "failed": figures["failed"],
            "failed_by_kind": _failed_by_kind(result, rows),
        }
        if event["label"] in out_of_rotation_s:
            left = out_of_rotation_s[event["label"]]
            entry["out_of_rotation_s"] = None if left is None else round(left, 3)
        if _is_loss(event["label"]):
            # Capacity with a node gone: after detection, until the restart.
            settled = [s["ok"] for s in timeline[int(start) + 3 : int(end)]]
            if settled and baseline:
                entry["capacity_after_loss"] = statistics.fmean(settled) / baseline
        if event["label"].startswith("restart"):
            # Back when the restarted node carries its share of the load again.
            node = event["label"].split()[-1]
            share = baseline / plan.nodes

            def serving(second: dict[str, Any], node: str = node, share: float = share) -> bool:
                return bool(second["ok_by_node"].get(node, 0) >= 0.8 * share)

            entry["recovery_s"] = _recovery(timeline, start, serving)
        elif event["label"] == "kill-primary db":

            def flowing(second: dict[str, Any]) -> bool:
                return bool(second["ok"] >= 0.9 * baseline)

            entry["recovery_s"] = _recovery(timeline, start, flowing)
        events.append(entry)
    ok = result.column("ok")
    failed = [r for r in result.rows if not r[ok]]
    fields = ("t", "name", "status", "node", "error")
    return {
        "baseline_rps": baseline,
        "requests": len(result.rows),
        "failed": len(failed),
        "failure_samples": [
            {
                f: (
                    round(r[result.column(f)] - result.started, 2)
                    if f == "t"
                    else r[result.column(f)]
                )
                for f in fields
            }
            for r in failed[:10]
        ],
        "events": events,
        "timeline": timeline,
        "event_marks": [
            {"t": round(e["t"] - result.started, 2), "label": e["label"]} for e in result.events
        ],
        "audit": audit_result,
    }


def _is_loss(label: str) -> bool:
    """A node leaving (drained or killed), not the database primary."""
    return label.startswith(("kill n", "drain"))


def capacity_after_loss(
    saturation_runs: Sequence[dict[str, Any]], expected: float
) -> list[dict[str, Any]]:
    """Capacity after each loss over the repeats at saturation (the analysed runs, in order).

    Each repeat's ratio is against its own run's baseline, paired within the
    run, so the machine's drift between runs stays out of it; then their
    median and the 95% Student-t interval of their mean (None for one
    repeat). A repeat whose ratio could not be measured is None in `ratios`
    and left out of the rest."""
    labels = list(
        dict.fromkeys(
            e["event"] for run in saturation_runs for e in run["events"] if _is_loss(e["event"])
        )
    )
    summary = []
    for label in labels:
        ratios = [
            next((e.get("capacity_after_loss") for e in run["events"] if e["event"] == label), None)
            for run in saturation_runs
        ]
        measured = [r for r in ratios if r is not None]
        interval = t_interval(measured)
        summary.append(
            {
                "event": label,
                "ratios": ratios,
                "median": statistics.median(measured) if measured else None,
                "mean": statistics.fmean(measured) if measured else None,
                "interval": None if interval is None else list(interval),
                "expected": expected,
            }
        )
    return summary


def _failed_by_kind(result: LoadResult, rows: list[list[Any]]) -> dict[str, int]:
    ok, name = result.column("ok"), result.column("name")
    counts: dict[str, int] = {}
    for row in rows:
        if not row[ok]:
            counts[row[name]] = counts.get(row[name], 0) + 1
    return counts


def _recovery(
    timeline: list[dict[str, Any]], start: float, recovered: Callable[[dict[str, Any]], bool]
) -> float | None:
    """Seconds from `start` until `recovered` holds for two whole seconds running."""
    for second in range(int(start) + 1, len(timeline) - 1):
        if recovered(timeline[second]) and recovered(timeline[second + 1]):
            return round(second - start, 1)
    return None


def acknowledged(result: LoadResult) -> dict[str, str]:
    name, status = result.column("name"), result.column("status")
    key, note = result.column("key"), result.column("note_id")
    return {
        r[key]: r[note] for r in result.rows if r[name] == "create" and r[status] == 201 and r[note]
    }


def _drill_and_audit(
    lab: Lab, plan: Plan, *, rate_per_user: float | None, runs: Runs
) -> dict[str, Any]:
    front = lab.load()["front"]
    result, left = drill(lab, plan, rate_per_user=rate_per_user, runs=runs)
    with _client_side(lab):
        audited = asyncio.run(audit(front, acknowledged(result), prefix=result.prefix))
    runs.end()
    return analyse(result, plan, audited, left)


def _repeat_name(i: int) -> str:
    """The report's name of saturation run `i` (from 1): the first keeps the name it always had."""
    return "saturation" if i == 1 else f"saturation-{i}"


def _saturation_names(runs: dict[str, Any]) -> list[str]:
    """The saturation repeats among `runs`, in the order they ran."""
    return [name for i in range(1, len(runs) + 1) if (name := _repeat_name(i)) in runs]


def progress(plan: Plan) -> Runs:
    """Progress lines of the runs, in their order: each run's length by the plan is its load's."""

    def saturation(i: int) -> str:
        return f"saturation {i} of {plan.repeats}" if plan.repeats > 1 else "saturation"

    names = [
        saturation(1),
        "steady",
        *(saturation(i) for i in range(2, plan.repeats + 1)),
        *(["control"] if plan.control else []),
    ]
    return Runs("nodeloss", [plan.duration_s] * len(names), names)


def run(plan: Plan, command: str) -> dict[str, Any]:
    """The drill at saturation, then below it, then at saturation again until there are
    plan.repeats saturation runs, each audited, all on one lab; then (plan.control) at
    saturation on a lab without HAProxy retries; the report (written by the caller)."""
    base = Path(tempfile.mkdtemp(prefix="cattle-nodeloss-", dir="/tmp"))
    base.chmod(0o755)
    runs: dict[str, Any] = {}
    options = LabOptions(
        nodes=plan.nodes,
        backend=plan.backend,
        cpu=plan.cpu,
        drain_delay_s=plan.drain_delay_s,
        front=plan.front,
    )
    # What protects the runs, and what the control switches off.
    protection, control_options = (
        ("pinning", replace(options, pinning=False))
        if plan.front == "anycast"
        else ("haproxy_retries", replace(options, retries=False))
    )
    lines = progress(plan)
    load = f"{plan.duration_s:g} s of load"

    def at_saturation(lab: Lab, i: int) -> None:
        name = _repeat_name(i)
        runs[name] = _drill_and_audit(lab, plan, rate_per_user=None, runs=lines)
        runs[name][protection] = True
        print(f"{name}: baseline {runs[name]['baseline_rps']:.0f} req/s", flush=True)

    try:
        lines.begin(f"{plan.nodes} nodes coming up, then {load} at saturation")
        lab = Lab(base / "run")
        lab.up(options)
        try:
            at_saturation(lab, 1)
            # The steady rate is a share of the first saturation run's baseline.
            lines.begin(f"{load} at {plan.steady_fraction:.0%} of the baseline")
            _restore(lab, plan)
            rate = plan.steady_fraction * runs["saturation"]["baseline_rps"] / plan.users
            runs["steady"] = _drill_and_audit(lab, plan, rate_per_user=rate, runs=lines)
            runs["steady"] |= {"offered_rps": rate * plan.users, protection: True}
            for i in range(2, plan.repeats + 1):
                lines.begin(f"{load} at saturation")
                _restore(lab, plan)
                at_saturation(lab, i)
        finally:
            lab.down()
        if plan.control:
            lines.begin(f"a lab with {protection.replace('_', ' ')} off coming up, then {load}")
            control = Lab(base / "control")
            control.up(control_options)
            try:
                runs["control"] = _drill_and_audit(control, plan, rate_per_user=None, runs=lines)
                runs["control"][protection] = False
            finally:
                control.down()
            print(f"control ({protection} off): {runs['control']['failed']} failed", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    expected = (plan.nodes - 1) / plan.nodes
    figures = {
        "plan": asdict(plan),
        "expected_capacity_after_loss": expected,
        "runs": runs,
        # The saturation repeats only: the control is another configuration,
        # where a request that failed is not capacity either.
        "capacity_after_loss": capacity_after_loss(
            [runs[name] for name in _saturation_names(runs)], expected
        ),
    }
    return reports.stamped(command, figures)


def _restore(lab: Lab, plan: Plan) -> None:
    """Every node running again between runs (the drill left them up, but be sure)."""
    for node in lab.status()["nodes"]:
        if not node["running"]:
            lab.restart(node["id"])


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in ("steady", "saturation", "control") if name in report["runs"]]
    fig, axes = plt.subplots(len(names), 1, figsize=(13, 4.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        data = report["runs"][name]
        timeline = data["timeline"]
        ts = [s["t"] for s in timeline]
        nodes = sorted({n for s in timeline for n in s["ok_by_node"]})
        stacks = [[s["ok_by_node"].get(n, 0) for s in timeline] for n in nodes]
        ax.stackplot(ts, stacks, labels=nodes, alpha=0.8, step="post")
        ax.bar(
            ts,
            [s["failed"] for s in timeline],
            color="red",
            width=0.9,
            label="failed/s",
            align="edge",
        )
        ax.set(xlabel="seconds", ylabel="requests/s")
        latency = ax.twinx()
        latency.plot(ts, [s["p50_ms"] for s in timeline], color="black", linewidth=1, label="p50")
        latency.plot(ts, [s["p99_ms"] for s in timeline], color="black", linestyle=":", label="p99")
        latency.set_ylabel("latency ms")
        for mark in data["event_marks"]:
            ax.axvline(mark["t"], color="gray", linestyle="--")
            ax.text(
                mark["t"],
                ax.get_ylim()[1] * 0.97,
                " " + mark["label"],
                rotation=90,
                va="top",
                fontsize=8,
            )
        failed = data["failed"]
        title = f"{_title(name, _front(report))}: {data['requests']} requests, {failed} failed"
        ax.set_title(f"{title}; audit {data['audit']}")
        handles, labels = ax.get_legend_handles_labels()
        handles2, labels2 = latency.get_legend_handles_labels()
        ax.legend(handles + handles2, labels + labels2, loc="lower left", fontsize=8, ncol=4)
    fig.suptitle(
        f"cattle node loss, {report['plan']['nodes']} nodes x {report['plan']['cpu']} core — "
        f"{reports.when(report)}, {report['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    front = _front(report)
    behind = (
        "behind the anycast front (BIRD with ECMP, an ExaBGP sidecar per node, "
        "locust in the client namespace)"
        if front == "anycast"
        else "behind HAProxy"
    )
    rotation = (
        "out of the router's next hops after s"
        if front == "anycast"
        else ("out of HAProxy's rotation after s")
    )
    lines = [
        "# Node loss: drain, kill -9 and restart under load",
        "",
        f"{reports.measured(report)} Reproduce with `{report['command']}`.",
        "",
        f"{plan['nodes']} nodes, each capped at {plan['cpu']} core, {behind}, "
        f"{plan['backend']} backend, {plan['users']} locust users on the read-mostly mix "
        "(readers with consistency tokens, writers with Idempotency-Keys and If-Match, listers). "
        "Clients never retry: every failure counted here reached a client.",
        "",
    ]
    expected = report["expected_capacity_after_loss"]
    saturation = _saturation_names(report["runs"])
    # Reports from before the repeats have no summary: it is one run's figures.
    summary = report.get("capacity_after_loss") or capacity_after_loss(
        [report["runs"][name] for name in saturation], expected
    )
    lines += _capacity_section(summary, len(saturation))
    names = ["saturation", "steady", *saturation[1:], "control"]
    for name in names:
        data = report["runs"].get(name)
        if not data:
            continue
        offered = f", offered {data['offered_rps']:.0f} req/s" if "offered_rps" in data else ""
        lines += [
            f"## {_title(name, front)} (baseline {data['baseline_rps']:.0f} req/s{offered})",
            "",
            f"{data['requests']} requests, **{data['failed']} failed**. Audit of every "
            f"acknowledged create: {data['audit']}.",
            "",
            f"| event | at s | took s | {rotation} "
            "| requests until next event | failed (by kind) | capacity after loss | recovery s |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for e in data["events"]:
            capacity = e.get("capacity_after_loss")
            cap = f"{capacity:.2f} (expected {expected:.2f})" if capacity is not None else ""
            recovery = e.get("recovery_s")
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(e["failed_by_kind"].items()))
            left = e.get("out_of_rotation_s", "")
            left = "not within 5 s" if left is None else left
            lines.append(
                f"| {e['event']} | {e['at_s']:.1f} | {e['took_s']:.1f} | {left} "
                f"| {e['requests']} | "
                f"{e['failed']}{f' ({kinds})' if kinds else ''} | {cap} | "
                f"{'' if recovery is None else recovery} |"
            )
        lines.append("")
    picture = "nodeloss-anycast.png" if front == "anycast" else "nodeloss.png"
    lines += [f"![node loss timeline]({picture})", ""]
    return "\n".join(lines)


def _capacity_section(summary: list[dict[str, Any]], repeats: int) -> list[str]:
    """The markdown of the capacity after each loss over the repeats at saturation."""

    def figure(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.2f}"

    lines = [
        f"## Capacity after a loss, over {repeats} repeat{'s' if repeats != 1 else ''} "
        "at saturation",
        "",
        "Throughput from 3 s after the loss until the restart, over the baseline of the "
        "same run (so the machine's drift between runs stays out), beside the expected "
        "(N-1)/N. The interval is the 95% Student-t interval of the mean over the repeats. "
        "The control run is left out: it is another configuration, where a failed request "
        "is not capacity either.",
        "",
        "| event | median | 95% interval | expected (N-1)/N | per repeat |",
        "|---|---:|---:|---:|---|",
    ]
    for entry in summary:
        interval = entry["interval"]
        if interval is not None:
            shown = f"{interval[0]:.2f} to {interval[1]:.2f}"
        else:
            shown = "none (one repeat)" if len(entry["ratios"]) == 1 else "none (one measured)"
        each = ", ".join(figure(r) for r in entry["ratios"])
        lines.append(
            f"| {entry['event']} | {figure(entry['median'])} | {shown} "
            f"| {entry['expected']:.2f} | {each} |"
        )
    return [*lines, ""]


def _front(report: dict[str, Any]) -> str:
    return str(report["plan"].get("front", "haproxy"))  # reports before --front: HAProxy


def _title(name: str, front: str = "haproxy") -> str:
    if name.startswith("saturation-"):
        name = f"saturation, repeat {name.removeprefix('saturation-')}"
    if front == "anycast":
        if name == "control":
            return "control: saturation with the router's pinning off (failures expected)"
        return f"{name}, router pinning on"
    if name == "control":
        return "control: saturation with HAProxy retries off (failures expected)"
    return f"{name}, HAProxy retries on"


def _repeats(text: str) -> int:
    """--repeats: a whole number, at least 1."""
    try:
        repeats = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if repeats < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {repeats}")
    return repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.experiments.nodeloss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long run of the code path")
    parser.add_argument("--backend", choices=("postgres", "patroni"), help="database mode")
    parser.add_argument(
        "--front",
        choices=("haproxy", "anycast"),
        default="haproxy",
        help="anycast: BIRD + ExaBGP sidecars in namespaces, SQLite (control: pinning off)",
    )
    parser.add_argument(
        "--repeats",
        type=_repeats,
        metavar="R",
        help=f"saturation runs, interleaved with the steady one (default {Plan.repeats}; "
        f"--smoke: {SMOKE.repeats})",
    )
    parser.add_argument(
        "--out", type=Path, help="writes OUT.json, OUT.md and OUT.png (default docs/results/)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT.md and OUT.png from OUT.json"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    if args.backend:
        plan = Plan(**{**asdict(plan), "backend": args.backend})
    if args.repeats is not None:
        plan = replace(plan, repeats=args.repeats)
    if args.front == "anycast":
        if args.backend:
            parser.error(
                "--front anycast runs on SQLite (the lab's anycast front has no --backend)"
            )
        plan = replace(plan, front="anycast", backend="sqlite")
    out = args.out or (ANYCAST_RESULTS if args.front == "anycast" else RESULTS)
    command = reports.command_line(__spec__.name, argv)
    report = reports.main(
        "nodeloss",
        out,
        render_only=args.render,
        measure=lambda: run(plan, command),
        markdown=markdown,
        plot=plot,
        lock=not args.smoke,  # a smoke run checks the code, not the machine
    )
    if report is None:
        return 0
    for name, data in report["runs"].items():
        print(
            f"{name}: {data['requests']} requests, {data['failed']} failed, audit {data['audit']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
