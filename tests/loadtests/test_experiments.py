"""The scale-out and node-loss experiments, shrunk to seconds: the code works end to end.

These check that each experiment brings up its lab, drives it, measures,
audits and writes its report, not how fast this machine is: figures are
checked for shape, never against a threshold.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from deploy.lab import cgroups
from loadtests import report as reports
from loadtests.experiments import nodeloss, scaleout
from loadtests.harness import machine, paired
from loadtests.harness.progress import Runs
from service.config import Settings
from tests.support import require, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def _lab_parts() -> None:
    require(
        shutil.which("haproxy") is not None or os.path.exists("/usr/sbin/haproxy"),
        "haproxy is not installed",
    )
    try:
        cgroups.check_available()
    except cgroups.CgroupsUnavailable as exc:
        require(False, str(exc))


@pytest.mark.usefixtures("_lab_parts")
def test_scaleout_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "scaleout"
    argv = ["--smoke", "--references", "2", "--out", str(out), "--refresh-plot"]
    assert scaleout.main(argv) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(saved) == []
    assert saved["command"] == f"python -m loadtests.experiments.scaleout {' '.join(argv)}"
    assert saved["stopped"] != scaleout.IN_PROGRESS  # the final report replaced the partial ones
    # Two pairs, each a window of two fleets of 2 and two fleets of one side by side.
    assert saved["plan"]["design"] == "side-by-side"
    assert saved["plan"]["references"] == 2
    assert saved["plan"]["fleet_nodes"] == 4
    assert len(saved["pairs"]) == 2
    assert [row["n"] for row in saved["rows"]] == list(scaleout.SMOKE.ns)
    for pair in saved["pairs"]:
        assert pair["efficiency"] == pytest.approx(pair["xk_rps"] / (2 * pair["x1_rps"]))
        one, fleet = pair["runs"]
        # X(1) is the mean of the two fleets of one, each with its own node n1,
        # and X(2) the mean of the two fleets of 2.
        for run in pair["runs"]:
            assert len(run["fleet_rps"]) == 2
            assert run["throughput_rps"] == pytest.approx(statistics.fmean(run["fleet_rps"]))
        assert one["serving"] == ["one-1/n1", "one-2/n1"]
        assert fleet["serving"] == [f"fleet-2-{j}/n{i}" for j in (1, 2) for i in (1, 2)]
        for run in pair["runs"]:
            assert run["throughput_rps"] > 0
            assert run["p50_ms"] > 0
            # Each fleet served its load, every node of it and nothing else.
            assert set(run["by_node"]) == set(run["serving"]), (
                run["by_node"],
                run.get("node_logs"),
            )
            # The validity checks ran on real samples of every serving node and the load generator.
            assert set(run["nodes"]) == set(run["serving"])
            assert run["loadgen_cpu_cores"] is not None
            assert isinstance(run["valid"], bool)
            # CPU the nodes used, read from their cgroups over the measured window.
            assert run["node_cpu_s"] > 0
            assert run["requests_per_cpu_s"] > 0
            assert run["cpu_source"]
            # The cache is off by default: no node counted a hit or a miss.
            assert not scaleout.SMOKE.cache
            assert run["cache_hits"] == run["cache_misses"] == 0
            assert run["cache_hit_ratio"] is None
    n1, n2 = saved["rows"]
    assert n1["efficiency_median"] == pytest.approx(1.0)
    assert len(n1["throughput_runs"]) == 2
    assert n2["pairs"] == 2
    assert n2["efficiency_median"] > 0
    # One block: no interval over blocks, and the report says why.
    assert n2["block_means"] == [pytest.approx(n2["efficiency_mean"])]
    assert n2["efficiency_interval"] is None
    assert "N=2: 1 block (an interval over blocks needs at least two)" in saved["problems"]
    assert n2["spread"] is not None
    assert not saved["valid"]
    # N=1, 2 cannot fit three parameters' worth of USL: the report says so.
    assert "error" in saved["usl"]
    text = out.with_suffix(".md").read_text()
    assert "| N | pairs (N=1: runs) | E(N) median | interval |" in text
    assert "4/k fleets of k nodes" in text and "After 1 s of warm-up" in text
    assert "No USL fit" in text
    assert out.with_suffix(".png").stat().st_size > 10_000


def _reference(rps: float, cpu_s: float, served: int, problems: list[str]) -> dict[str, object]:
    return {
        "n": 1,
        "serving": ["n1"],
        "requests": served,
        "failed": len(problems),
        "throughput_rps": rps,
        "p50_ms": rps,  # any distinct value per point
        "p95_ms": 2 * rps,
        "p99_ms": 3 * rps,
        "by_node": {"n1": served},
        "by_kind": {"read": served - 1, "list": 1},
        "loadgen_cpu_cores": 0.01,
        "machine_busy": rps / 1000,
        "nodes": {"n1": {"cpu_cores": 0.05, "throttled_share": 1.0}},
        "valid": not problems,
        "problems": problems,
        "node_cpu_s": cpu_s,
        "cpu_span_s": 10.0,
        "requests_per_cpu_s": served / cpu_s,
        "cpu_source": "cgroup",
        "cache_hits": 0.0,
        "cache_misses": 0.0,
        "cache_hit_ratio": None,
        "pinned_core": 1,
    }


def test_fleets_of_one_make_one_reference_whose_x1_is_their_mean():
    first, second = _reference(60, 0.5, 600, []), _reference(40, 0.5, 400, ["n1 not saturated"])
    assert scaleout.merge_fleets({"one-1": first}) is first
    merged = scaleout.merge_fleets({"one-1": first, "one-2": second})
    assert merged["throughput_rps"] == 50  # one node's X(1): their mean, not their sum
    assert merged["fleet_rps"] == [60, 40]
    assert merged["requests"] == 1000
    assert merged["requests_per_cpu_s"] == 1000  # 1000 served over 1.0 CPU-second
    assert merged["by_kind"] == {"read": 998, "list": 2}
    assert merged["serving"] == ["one-1/n1", "one-2/n1"] == list(merged["by_node"])
    assert merged["p50_ms"] == 50
    assert merged["machine_busy"] == 0.06
    # One fleet of one not saturated makes the reference not valid, and says which.
    assert not merged["valid"]
    assert merged["problems"] == ["one-2: n1 not saturated"]


def test_fleets_of_k_repeat_to_hold_the_same_nodes_at_every_k():
    plan = scaleout.Plan()  # as many nodes as the largest N, 8
    assert {k: scaleout.fleets(plan, k) for k in (1, 2, 4, 8)} == {1: 1, 2: 4, 4: 2, 8: 1}
    assert scaleout.fleets(scaleout.Plan(ns=(1, 2, 4)), 2) == 2
    assert scaleout.fleets(scaleout.Plan(fleet_nodes=8), 16) == 1
    assert scaleout.fleets(scaleout.Plan(fleet_nodes=0), 2) == 1  # one fleet of k, as before
    # X(k) is one fleet's throughput: the mean of the fleets of k, not their sum.
    first, second = _reference(90, 1.0, 900, []), _reference(70, 1.0, 700, [])
    for point in (first, second):
        point.update(n=2, serving=["n1", "n2"], by_node={"n1": 450, "n2": 450})
    merged = scaleout.merge_fleets({"fleet-2-1": first, "fleet-2-2": second})
    assert merged["n"] == 2
    assert merged["throughput_rps"] == 80
    assert merged["fleet_rps"] == [90, 70]
    assert merged["serving"] == ["fleet-2-1/n1", "fleet-2-1/n2", "fleet-2-2/n1", "fleet-2-2/n2"]


def test_the_labs_start_order_alternates_from_one_block_of_k_to_the_next():
    plan = scaleout.Plan(start="alternate")  # 4 pairs a block
    ks, ones = ["fleet-2-1", "fleet-2-2"], ["one-1", "one-2"]
    orders = [scaleout.start_order(ks, ones, first, plan) for first in (0, 4, 8, 12)]
    assert orders == [ks + ones, ones + ks, ks + ones, ones + ks]
    # The control: the fleets of k always come up first, as before a8e669b.
    fixed = scaleout.Plan(start="fleets-first")
    assert {tuple(scaleout.start_order(ks, ones, first, fixed)) for first in (0, 4)} == {
        tuple(ks + ones)
    }


def _mean_place(order: list[str], side: list[str]) -> float:
    return sum(order.index(label) for label in side) / len(side)


@pytest.mark.parametrize("k_labs", [1, 2, 4])
def test_a_balanced_start_order_gives_both_sides_the_same_mean_place(k_labs):
    plan = scaleout.Plan()  # the default; 4 pairs a block
    ks = [f"fleet-{8 // k_labs}-{j}" for j in range(1, k_labs + 1)]
    ones = [f"one-{i}" for i in range(1, 5)]
    orders = [scaleout.start_order(ks, ones, first, plan) for first in (0, 4, 8, 12)]
    for order in orders:
        assert sorted(order) == sorted(ks + ones)
        assert _mean_place(order, ks) == _mean_place(order, ones)
    assert orders[0] == orders[2] and orders[1] == orders[3]
    if k_labs > 1:  # even and odd blocks take different mirror pairs
        assert orders[0] != orders[1]
        assert orders[0][0] in ks and orders[1][0] in ones  # neither side always first
    else:  # one fleet of 8 in the middle of four fleets of one
        assert orders[0] == ["one-1", "one-2", ks[0], "one-3", "one-4"]
    # The control that made it needed: the fleets first, a whole side earlier.
    fixed = scaleout.start_order(ks, ones, 0, scaleout.Plan(start="fleets-first"))
    assert _mean_place(fixed, ks) < _mean_place(fixed, ones)


def test_a_start_order_that_cannot_balance_puts_the_odd_lab_nearest_the_middle():
    # One fleet of k beside three fleets of one: four places, no middle one.
    order = scaleout.start_order(["fleet"], ["one-1", "one-2", "one-3"], 0, scaleout.Plan())
    assert order.index("fleet") in (1, 2)


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return Settings(node_id="n1")


def test_the_bus_control_starts_every_node_with_its_bus_off(monkeypatch):
    shipped = scaleout._lab_options(scaleout.Plan(bus_timers="shipped"), 8).node_env
    control = scaleout._lab_options(scaleout.Plan(bus=False), 8).node_env
    assert control == shipped | {"CATTLE_BUS": "false"}
    for env, bus in ((shipped, True), (control, False)):
        assert _settings_from(env, monkeypatch).bus is bus


def test_the_bus_timers_run_on_the_models_clock_unless_shipped_is_asked(monkeypatch):
    shipped = Settings(node_id="n1")
    # At 0.05 core a node stands for a node of one core slowed 20 times: its bus
    # waits 20 times as long between heartbeats and before it suspects a peer.
    model = _settings_from(scaleout._lab_options(scaleout.Plan(cpu=0.05), 8).node_env, monkeypatch)
    assert model.bus
    assert model.bus_heartbeat_interval_s == pytest.approx(20 * shipped.bus_heartbeat_interval_s)
    assert model.bus_suspect_after_s == pytest.approx(20 * shipped.bus_suspect_after_s)
    assert model.bus_dead_after_s == pytest.approx(20 * shipped.bus_dead_after_s)
    # The control, and a node of a whole core, run the timers as shipped.
    for plan in (scaleout.Plan(bus_timers="shipped"), scaleout.Plan(cpu=1.0)):
        ran = _settings_from(scaleout._lab_options(plan, 8).node_env, monkeypatch)
        assert ran.bus_heartbeat_interval_s == shipped.bus_heartbeat_interval_s
        assert ran.bus_suspect_after_s == shipped.bus_suspect_after_s
    # The report says which, and reports from before the choice read as shipped.
    text = scaleout._bus_text({"cpu": 0.05, "bus": True, "bus_timers": "model"})
    assert "**on the model's clock**" in text and "heartbeats every 20 s" in text
    assert "as shipped" in scaleout._bus_text({"cpu": 0.05, "bus": True, "bus_timers": "shipped"})
    assert scaleout._bus_text({"cpu": 0.05, "bus": True}) == "**on**."


def test_bus_timers_the_nodes_would_refuse_are_a_cli_error(tmp_path, capsys):
    # At 0.01 core the heartbeat would be 100 s, past the setting's bound of 60 s.
    with pytest.raises(SystemExit) as exited:
        scaleout.main(["--cpu", "0.01", "--out", str(tmp_path / "never")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "CATTLE_BUS_HEARTBEAT_INTERVAL_S to 100 s" in err and "--bus-timers shipped" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("_lab_parts")
def test_scaleout_smoke_runs_the_alternating_design_too(tmp_path):
    out = tmp_path / "alternating"
    # With the bus off (the control), which the nodes start with as well.
    argv = ["--smoke", "--design", "alternating", "--bus", "off", "--out", str(out)]
    assert scaleout.main(argv) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["plan"]["design"] == "alternating"
    assert saved["plan"]["bus"] is False
    assert "The node bus is **off (the control)**." in out.with_suffix(".md").read_text()
    # One pair in each order, N=1 and N=2 back to back in one lab.
    assert [pair["order"] for pair in saved["pairs"]] == [[1, 2], [2, 1]]
    for pair in saved["pairs"]:
        for run in pair["runs"]:
            # Only the serving nodes served (the other in MAINT), and their cgroups were read.
            assert len(run["serving"]) == run["n"]
            assert set(run["by_node"]) == set(run["serving"]), run.get("node_logs")
            assert run["node_cpu_s"] > 0
            assert run["requests_per_cpu_s"] > 0


def test_side_by_side_pins_the_nodes_to_one_core_and_the_rest_off_it():
    core = scaleout.node_core()
    everything = os.sched_getaffinity(0)
    if core is None:  # one core: nothing to pin, nothing changes
        with scaleout.infrastructure_off_core(core):
            assert os.sched_getaffinity(0) == everything
        return
    assert core == max(everything)
    with scaleout.infrastructure_off_core(core):
        assert os.sched_getaffinity(0) == everything - {core}
        # A process started meanwhile (a database, HAProxy, a node) stays off the core...
        child = subprocess.Popen(
            [sys.executable, "-c", "import threading, time; "
             "threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"]
        )  # fmt: skip
    try:
        assert os.sched_getaffinity(0) == everything  # ...and the experiment has its cores back
        assert os.sched_getaffinity(child.pid) == everything - {core}
        # A node is then moved onto it, every thread of it.
        threads = lambda: len(os.listdir(f"/proc/{child.pid}/task"))  # noqa: E731
        assert wait_until(lambda: threads() == 2, timeout_s=10) is not None
        machine.pin_process(child.pid, {core})
        for task in os.listdir(f"/proc/{child.pid}/task"):
            assert os.sched_getaffinity(int(task)) == {core}
    finally:
        child.kill()
        child.wait(timeout=10)


def test_cache_counters_are_read_from_prometheus_text():
    text = "\n".join(
        [
            "# TYPE cattle_cache_hits_total counter",
            'cattle_cache_hits_total{service_name="x"} 30.0',
            "cattle_cache_hits_created 1.7e9",
            "cattle_cache_misses_total 10.0",
        ]
    )
    assert scaleout._counter(text, "cattle_cache_hits_total") == 30.0
    assert scaleout._counter(text, "cattle_cache_misses_total") == 10.0
    assert scaleout._counter(text, "cattle_cache_refused_total") == 0.0


def test_usl_fit_recovers_known_parameters():
    points = [
        {"n": n, "throughput_rps": scaleout.usl(n, 100.0, 0.03, 0.001)} for n in (1, 2, 4, 8, 16)
    ]
    fit = scaleout.fit_usl(points)
    assert fit is not None
    assert fit["lambda"] == pytest.approx(100.0, rel=1e-3)
    assert fit["sigma"] == pytest.approx(0.03, abs=1e-4)
    assert fit["kappa"] == pytest.approx(0.001, abs=1e-5)


def _fake_runs(x, noise=None):
    """A block measure without nodes: X(N) from `x` for each segment, times a
    drift that grows every segment."""
    calls = itertools.count()
    noise = noise or (lambda n, i: 1.0)

    def measure_one(n, run_dir):
        i = next(calls)
        rps = x(n) * (1 + 0.01 * i) * noise(n, i)  # the machine speeds up 1% per run
        return {
            "n": n, "throughput_rps": rps, "requests_per_cpu_s": x(n) / n, "p50_ms": 10.0,
            "p99_ms": 30.0, "loadgen_cpu_cores": 0.1, "machine_busy": 0.3, "nodes": {},
            "valid": True, "problems": [],
        }  # fmt: skip

    def measure(k, orders, first, run_dir):
        return [measure_one(n, run_dir) for order in orders for n in order]

    return measure


def test_scaleout_pairs_alternate_and_cancel_the_drift(tmp_path):
    plan = scaleout.Plan(ns=(1, 2, 4, 8), block_pairs=2, min_pairs=4, max_pairs=6)
    x = lambda n: scaleout.usl(n, 50.0, 0.02, 0.002)  # noqa: E731
    pairs, stopped = scaleout.run_pairs(plan, _fake_runs(x), tmp_path)
    assert stopped == "every interval narrow"
    # Blocks round-robin over k, each block's pairs alternating which N runs first.
    assert [(p["k"], p["order"]) for p in pairs[:8]] == [
        (2, [1, 2]), (2, [2, 1]), (4, [1, 4]), (4, [4, 1]), (8, [1, 8]), (8, [8, 1]),
        (2, [1, 2]), (2, [2, 1]),
    ]  # fmt: skip
    assert [p["index"] for p in pairs if p["k"] == 2] == [0, 1, 2, 3]
    assert len(pairs) == 3 * plan.min_pairs
    report = scaleout.summarize(pairs, plan, stopped)
    assert report["valid"], report["problems"]
    for row in report["rows"][1:]:
        true = x(row["n"]) / (row["n"] * x(1))
        # A 1%-per-run drift moves single pairs by about 1% either way, by order;
        # the median over both orders stays close, and the interval holds it.
        low, high = row["efficiency_interval"]
        assert low <= true <= high
        assert row["efficiency_median"] == pytest.approx(true, abs=0.01)
        assert row["narrow"]
    check = report["usl"]["check"]
    assert report["usl"]["fit_ns"] == [1, 2, 4]
    assert check["n"] == 8
    assert abs(check["relative_error"]) < 0.02
    low, high = check["predicted_interval"]
    assert low <= check["predicted_rps"] <= high * 1.0001


def test_scaleout_stops_at_the_pair_bound_when_the_interval_stays_wide(tmp_path):
    plan = scaleout.Plan(ns=(1, 2), block_pairs=2, min_pairs=2, max_pairs=4, ci_width=0.1)
    # The first block's fleet of two is 20% faster than the second's: the
    # blocks disagree by about 10%, wider than the stated spread.
    wobble = lambda n, i: 1.2 if (n == 2 and i < 4) else 1.0  # noqa: E731
    pairs, stopped = scaleout.run_pairs(plan, _fake_runs(lambda n: 50.0 * n, wobble), tmp_path)
    assert stopped == "pair bound (4 per k)"
    assert len(pairs) == 4
    report = scaleout.summarize(pairs, plan, stopped)
    assert not report["rows"][1]["narrow"]
    # Not valid, although every run passed its own checks.
    assert all(run["valid"] for pair in pairs for run in pair["runs"])
    assert not report["valid"]
    assert any("the repeats disagree" in problem for problem in report["problems"])


def test_windows_that_agree_inside_blocks_that_disagree_make_the_run_not_valid(tmp_path):
    # Three blocks of ten windows; the second block's fleet of two is 8% slower
    # in every one of its windows (its labs, not the moment).
    plan = scaleout.Plan(ns=(1, 2), block_pairs=10, min_pairs=30, max_pairs=30)
    slow_block = lambda n, i: 0.92 if (n == 2 and 20 <= i < 40) else 1.0  # noqa: E731
    pairs, _ = scaleout.run_pairs(plan, _fake_runs(lambda n: 50.0 * n, slow_block), tmp_path)
    report = scaleout.summarize(pairs, plan, "pair bound")
    row = report["rows"][1]
    assert row["block_means"] == pytest.approx([1.0, 0.92, 1.0], abs=0.01)
    # Over the 30 windows the interval would be narrow ...
    low, high = paired.t_interval([p["efficiency"] for p in pairs])
    assert high - low < plan.ci_width / 2
    # ... over the three blocks it is not, and the run is not valid.
    assert row["interval_width"] > plan.ci_width
    assert not report["valid"]
    assert any("the repeats disagree" in problem for problem in report["problems"])
    text = scaleout.markdown(reports.stamped("python -m loadtests.experiments.scaleout", report))
    assert (
        "Mean E of each block, in the order they ran (the interval is over these): N=2: 1.0" in text
    )


def test_scaleout_reports_progress_and_a_drawable_report_after_every_pair(tmp_path, capsys):
    plan = scaleout.Plan(ns=(1, 2, 4), min_pairs=2, max_pairs=2)
    partials = []
    final = scaleout.run(
        plan, "python -m loadtests.experiments.scaleout", _fake_runs(lambda n: 10.0 * n),
        refresh=partials.append,
    )  # fmt: skip
    # One report per block, each of the pairs so far, each drawn as the final one is.
    assert [len(p["pairs"]) for p in partials] == [2, 4]
    assert all(p["stopped"] == scaleout.IN_PROGRESS for p in partials)
    assert final["stopped"] != scaleout.IN_PROGRESS and len(final["pairs"]) == 4
    for i, partial in enumerate(partials):
        assert "Stopped: not yet" in scaleout.markdown(partial)
        scaleout.plot(partial, tmp_path / f"partial-{i}.png")
        assert (tmp_path / f"partial-{i}.png").stat().st_size > 0
    # Before every block: which N, which pairs of how many, how long in and left.
    lines = [line for line in capsys.readouterr().out.splitlines() if "of at most" in line]
    assert lines[0].startswith(
        "block of N=1/N=2, its pairs 1-2: pairs 1-2 of at most 4, 0.0 min in"
    )
    assert "left" not in lines[0]  # no pair yet to estimate from
    assert lines[1].startswith("block of N=1/N=4, its pairs 1-2: pairs 3-4 of at most 4")
    assert "min left" in lines[1]


@pytest.mark.parametrize(
    ("design", "said"),
    [("alternating", "in both orders"), ("side-by-side", "pair(s) (at least 2)")],
)
def test_scaleout_stops_at_the_time_bound(tmp_path, design, said):
    plan = scaleout.Plan(ns=(1, 2, 4), design=design, min_pairs=2, max_pairs=10, max_minutes=1.0)
    ticks = itertools.count(step=25)  # every clock read: 25 s later
    pairs, stopped = scaleout.run_pairs(
        plan, _fake_runs(lambda n: 10.0 * n), tmp_path, clock=lambda: float(next(ticks))
    )
    assert stopped == "time bound (1 min)"
    report = scaleout.summarize(pairs, plan, stopped)
    # Too few pairs (alternating: in one order only): said, and not valid.
    assert not report["valid"]
    assert any(said in problem for problem in report["problems"]), report["problems"]


def _report_of(x, tmp_path, noise=None):
    plan = scaleout.Plan(ns=(1, 2, 4), block_pairs=2, min_pairs=4, max_pairs=4)
    pairs, stopped = scaleout.run_pairs(plan, _fake_runs(x, noise), tmp_path)
    return scaleout.summarize(pairs, plan, stopped)


def test_a_second_run_agrees_with_the_first_only_where_its_medians_are_close(tmp_path):
    first = _report_of(lambda n: 50.0 * n, tmp_path / "first")
    assert first["valid"], first["problems"]
    same = scaleout.agreement(_report_of(lambda n: 50.0 * n, tmp_path / "same"), first, "a.json")
    assert same["valid"] and same["agreement"]["agree"]
    assert [r["agree"] for r in same["agreement"]["rows"]] == [True, True]
    # The control: N=4 runs 8% slower in the second run; each run alone is
    # valid (its pairs agree among themselves), the two together are not.
    slower = _report_of(lambda n: 50.0 * n * (0.92 if n == 4 else 1.0), tmp_path / "slow")
    assert slower["valid"], slower["problems"]
    compared = scaleout.agreement(slower, first, "a.json")
    assert not compared["valid"]
    assert [(r["n"], r["agree"]) for r in compared["agreement"]["rows"]] == [(2, True), (4, False)]
    assert any("N=4" in p and "the runs disagree" in p for p in compared["problems"])
    text = scaleout.markdown(reports.stamped("cmd", compared))
    assert "| 4 | 0.920 | 1.000 | -0.080 | **no** |" in text


def test_agree_with_a_file_that_is_not_a_report_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    for path, said in ((tmp_path / "none.json", "no such file"), (bad, "not a scale-out report")):
        with pytest.raises(SystemExit) as exc:
            scaleout.main(["--agree-with", str(path), "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert said in capsys.readouterr().err


def test_progress_lines_say_which_run_and_the_time_in_and_left():
    now = [0.0]
    lines: list[str] = []
    runs = Runs("x", [60.0, 60.0, 60.0], ["a", "b", "c"], clock=lambda: now[0], echo=lines.append)
    runs.begin("coming up")
    now[0] = 30
    runs.note("+30 s drain n1")
    now[0] = 90
    runs.end()  # half again as long as planned: so will the others be
    runs.begin()
    now[0] = 100
    runs.note("+10 s kill n2")
    now[0] = 300  # far past its estimate: at least the last run is left
    runs.note("+210 s restart n2")
    assert lines == [
        "x: run 1 of 3 (a), coming up, 0.0 min in, about 3.0 min left",
        "x: run 1 of 3 (a): +30 s drain n1, 0.5 min in, about 2.5 min left",
        "x: run 2 of 3 (b), 1.5 min in, about 3.0 min left",
        "x: run 2 of 3 (b): +10 s kill n2, 1.7 min in, about 2.8 min left",
        "x: run 2 of 3 (b): +210 s restart n2, 5.0 min in, about 1.5 min left",
    ]


@pytest.mark.usefixtures("_lab_parts")
def test_nodeloss_smoke_runs_the_drill_and_audits(tmp_path, capsys):
    out = tmp_path / "nodeloss"
    assert nodeloss.main(["--smoke", "--out", str(out)]) == 0
    # While it ran: each run as it began, and each event of its drill as it fired.
    printed = capsys.readouterr().out
    times = r", [\d.]+ min in, about [\d.]+ min left$"
    begun = re.findall(rf"^nodeloss: run (\d) of 3 \((\w+)\), .*{times}", printed, re.M)
    assert begun == [("1", "saturation"), ("2", "steady"), ("3", "control")], printed
    fired = re.findall(
        rf"^nodeloss: run (\d) of 3 \(\w+\): \+([\d.]+) s (.+?){times}", printed, re.M
    )
    drill = [(f"{at:g}", f"{event} {node}") for at, event, node in nodeloss.SMOKE.schedule]
    assert fired == [(k, *event) for k in "123" for event in drill], printed
    saved = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(saved) == []
    assert set(saved["runs"]) == {"saturation", "steady", "control"}
    assert [saved["runs"][name]["haproxy_retries"] for name in ("saturation", "control")] == [
        True,
        False,
    ]
    for name, run in saved["runs"].items():
        events = [e["event"] for e in run["events"]]
        assert events == ["drain n1", "restart n1", "kill n2", "restart n2"], name
        assert all(e["error"] is None for e in run["events"]), run["events"]
        # A killed node is out of HAProxy's rotation within a second (it
        # observes live traffic), a drained one as soon as its agent says so.
        left = {
            e["event"]: e["out_of_rotation_s"] for e in run["events"] if "out_of_rotation_s" in e
        }
        assert set(left) == {"drain n1", "kill n2"}, run["events"]
        assert all(s is not None and s < 1.0 for s in left.values()), left
        assert run["audit"]["acknowledged"] > 0
        assert run["audit"]["lost"] == 0
        assert run["audit"]["duplicated"] == 0
        assert len(run["timeline"]) >= nodeloss.SMOKE.duration_s - 1
    assert saved["runs"]["steady"]["offered_rps"] > 0
    text = out.with_suffix(".md").read_text()
    assert "| drain n1 |" in text
    assert "control: saturation with HAProxy retries off (failures expected)" in text
    assert out.with_suffix(".png").stat().st_size > 10_000


def _analysed(drain, kill, baseline_rps=100.0):
    """An analysed node-loss run, as `nodeloss.analyse` returns it, with known capacities."""

    def event(label, capacity=None):
        entry = {
            "event": label, "at_s": 0.0, "took_s": 0.0, "error": None, "requests": 10,
            "failed": 0, "failed_by_kind": {},
        }  # fmt: skip
        return entry if capacity is None else entry | {"capacity_after_loss": capacity}

    return {
        "baseline_rps": baseline_rps, "requests": 100, "failed": 0,
        "audit": {"acknowledged": 1, "lost": 0, "duplicated": 0, "unexpected": 0},
        "events": [
            event("drain n1", drain), event("restart n1"), event("kill n2", kill),
            event("restart n2"),
        ],
    }  # fmt: skip


def test_nodeloss_capacity_after_loss_over_repeats_has_a_median_and_an_interval():
    runs = [_analysed(0.70, 0.80), _analysed(0.74, 0.72), _analysed(0.78, 0.76)]
    drain, kill = nodeloss.capacity_after_loss(runs, expected=0.75)
    assert drain["event"] == "drain n1" and kill["event"] == "kill n2"
    assert drain["ratios"] == [0.70, 0.74, 0.78]
    assert kill["ratios"] == [0.80, 0.72, 0.76]  # in the order the repeats ran
    for entry in (drain, kill):
        assert entry["median"] == pytest.approx(0.76 if entry is kill else 0.74)
        assert entry["mean"] == pytest.approx(0.76 if entry is kill else 0.74)
        assert entry["expected"] == 0.75
        # Standard deviation 0.04 over 3 repeats; t(0.975, 2 degrees of freedom) = 4.3027.
        half = 4.302653 * 0.04 / 3**0.5
        low, high = entry["interval"]
        assert low == pytest.approx(entry["mean"] - half, abs=1e-6)
        assert high == pytest.approx(entry["mean"] + half, abs=1e-6)
    text = "\n".join(nodeloss._capacity_section([drain, kill], 3))
    assert "## Capacity after a loss, over 3 repeats at saturation" in text
    assert "| drain n1 | 0.74 | 0.64 to 0.84 | 0.75 | 0.70, 0.74, 0.78 |" in text


def test_nodeloss_capacity_after_loss_of_one_repeat_has_no_interval():
    (drain, kill) = nodeloss.capacity_after_loss([_analysed(0.7, 0.8)], expected=0.5)
    assert (drain["median"], kill["median"]) == (0.7, 0.8)
    assert drain["interval"] is None and kill["interval"] is None
    text = "\n".join(nodeloss._capacity_section([drain, kill], 1))
    assert "over 1 repeat at saturation" in text
    assert "| kill n2 | 0.80 | none (one repeat) | 0.50 | 0.80 |" in text


def test_nodeloss_capacity_after_loss_leaves_out_a_repeat_it_could_not_measure():
    runs = [_analysed(0.70, 0.80), _analysed(None, 0.72), _analysed(0.78, 0.76)]
    drain, _ = nodeloss.capacity_after_loss(runs, expected=0.75)
    assert drain["ratios"] == [0.70, None, 0.78]
    assert drain["median"] == pytest.approx(0.74)
    assert drain["interval"] is not None
    assert "0.70, not measured, 0.78" in "\n".join(nodeloss._capacity_section([drain], 3))


def test_nodeloss_interleaves_the_saturation_repeats_with_the_steady_run(monkeypatch, capsys):
    """The run's order, names and summary, with a fake lab and fake drills (no nodes)."""

    class FakeLab:
        def __init__(self, path):
            pass

        def up(self, options):
            self.retries = options.retries

        def down(self):
            pass

        def status(self):
            return {"nodes": [{"id": "n1", "running": True}]}

    drills = []
    capacities = iter([(0.70, 0.80), (None, None), (0.74, 0.72), (0.78, 0.76), (0.1, 0.1)])

    def drill_and_audit(lab, plan, *, rate_per_user, runs):
        drills.append(("saturation" if rate_per_user is None else "steady", lab.retries))
        runs.end()
        return _analysed(*next(capacities))

    monkeypatch.setattr(nodeloss, "Lab", FakeLab)
    monkeypatch.setattr(nodeloss, "_drill_and_audit", drill_and_audit)
    report = nodeloss.run(nodeloss.Plan(repeats=3), "python -m loadtests.experiments.nodeloss")
    assert drills == [
        ("saturation", True), ("steady", True), ("saturation", True), ("saturation", True),
        ("saturation", False),
    ]  # fmt: skip
    assert list(report["runs"]) == [
        "saturation", "steady", "saturation-2", "saturation-3", "control",
    ]  # fmt: skip
    begun = re.findall(r"^nodeloss: run (\d) of 5 \(([\w ]+)\)", capsys.readouterr().out, re.M)
    assert begun == [
        ("1", "saturation 1 of 3"), ("2", "steady"), ("3", "saturation 2 of 3"),
        ("4", "saturation 3 of 3"), ("5", "control"),
    ]  # fmt: skip
    # The saturation repeats only: not the steady run, nor the control.
    drain, kill = report["capacity_after_loss"]
    assert drain["ratios"] == [0.70, 0.74, 0.78]
    assert kill["ratios"] == [0.80, 0.72, 0.76]
    text = nodeloss.markdown(report)
    assert "## Capacity after a loss, over 3 repeats at saturation" in text
    assert "## saturation, repeat 3, HAProxy retries on (baseline 100 req/s)" in text


def test_nodeloss_progress_of_one_repeat_keeps_the_three_runs():
    assert list(nodeloss.progress(nodeloss.SMOKE).labels) == ["saturation", "steady", "control"]


def test_nodeloss_repeats_below_one_is_a_clear_cli_error(tmp_path, capsys):
    for given in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exc:
            nodeloss.main(["--smoke", "--repeats", given, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert "argument --repeats" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="at least 1"):
        nodeloss.Plan(repeats=0)


def test_a_node_log_tail_leaves_out_access_lines(tmp_path):
    # What a failed segment's report shows of each node: its own words, not its traffic.
    log = tmp_path / "n1.log"
    access = '{"level": "INFO", "logger": "service.access", "message": "GET /v1/notes 200"}'
    said = [
        '{"level": "WARNING", "logger": "service.bus", "message": "bus: peer n2 alive -> suspect"}',
        "Traceback (most recent call last):",
        '  File "service/app.py", line 1, in <module>',
        "RuntimeError: broken",
    ]
    log.write_text("\n".join([access, said[0], access, *said[1:], access]) + "\n")
    assert scaleout.node_log_tail(log) == said
    assert scaleout.node_log_tail(log, lines=2) == said[-2:]
    assert scaleout.node_log_tail(tmp_path / "gone.log") == []
