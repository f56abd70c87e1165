"""Scale-out experiment: does throughput grow linearly with the number of nodes?

For N in 1, 2, 4, 8 it brings up the lab with N nodes, each capped at the
same CPU fraction (so one machine behaves like N small ones), drives it to
saturation through HAProxy with locust, and measures steady-state
throughput after a warm-up. It reports X(N), the efficiency
E(N) = X(N) / (N * X(1)), a Universal Scalability Law fit
X(N) = lambda N / (1 + sigma (N-1) + kappa N (N-1)) with its uncertainty, and
latency percentiles per N, in docs/results/scaleout.{md,json,png}.

A run is valid only if the nodes were the bottleneck: every node throttled
by its CPU cap in most periods and using its share, the load generator with
headroom, the machine not saturated. The report says which check failed.

    python -m loadtests.experiments.scaleout            # the full run (about 6 minutes)
    python -m loadtests.experiments.scaleout --smoke    # seconds: checks the code, not the machine
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.lab.cluster import Lab, LabOptions
from loadtests import report as reports
from loadtests.harness import analysis
from loadtests.harness.loadrun import LoadResult, run_load

RESULTS = reports.RESULTS / "scaleout"

# Validity thresholds (documented in docs/results/README.md).
LOADGEN_MAX_CORES = 0.8  # one locust process: keep it well short of its core
NODE_MIN_THROTTLED = 0.5  # a saturated capped node is throttled in most periods
NODE_MIN_SHARE = 0.85  # ... and uses (nearly) all of its cap
MACHINE_MAX_BUSY = 0.95  # the machine itself must not be the limit
MAX_ERROR_RATE = 0.01


@dataclass(frozen=True)
class Plan:
    ns: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 2
    cpu: float = 0.1
    # 20 users split exactly 18/1/1 by the read-mostly weights (90/5/5), so
    # every N runs the same mix; fewer users would round it differently per N.
    users_per_node: int = 20
    warmup_s: float = 6.0
    measure_s: float = 20.0
    backend: str = "postgres"
    mix: str = "read-mostly"


SMOKE = Plan(
    ns=(1, 2), repeats=1, cpu=0.25, users_per_node=3, warmup_s=2.0, measure_s=3.0, backend="sqlite"
)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def measure(n: int, plan: Plan, run_dir: Path) -> dict[str, Any]:
    """One point: N nodes at saturation, steady-state figures and validity checks."""
    lab = Lab(run_dir)
    lab.up(LabOptions(nodes=n, backend=plan.backend, cpu=plan.cpu, drain_delay_s=0.5))
    try:
        state = lab.load()
        result = run_load(
            state["front"],
            state["nodes"],
            users=n * plan.users_per_node,
            duration_s=plan.warmup_s + plan.measure_s,
            mix=plan.mix,
        )
    finally:
        lab.down()
    return _point(n, plan, result)


def _point(n: int, plan: Plan, result: LoadResult) -> dict[str, Any]:
    start, end = plan.warmup_s, plan.warmup_s + plan.measure_s
    figures = analysis.summarize(result, analysis.window(result, start, end), plan.measure_s)
    lo, hi = result.started + start, result.started + end
    samples = [s for s in result.samples if lo <= s.t <= hi + 1]
    node_ids = sorted({k for s in samples for k in s.node_cpu})
    nodes = {
        node: {
            "cpu_cores": _mean([s.node_cpu[node] for s in samples if node in s.node_cpu]),
            "throttled_share": _mean(
                [s.node_throttled[node] for s in samples if node in s.node_throttled]
            ),
        }
        for node in node_ids
    }
    loadgen = _mean([s.loadgen_cpu for s in samples])
    busy = _mean([s.machine_busy for s in samples])
    problems = []
    if loadgen is None or loadgen > LOADGEN_MAX_CORES:
        problems.append(f"load generator used {loadgen or 0:.2f} cores (max {LOADGEN_MAX_CORES})")
    for node, use in nodes.items():
        throttled, cores = use["throttled_share"] or 0.0, use["cpu_cores"] or 0.0
        if throttled < NODE_MIN_THROTTLED or cores < NODE_MIN_SHARE * plan.cpu:
            problems.append(
                f"{node} not saturated: {cores:.3f} cores of {plan.cpu}, "
                f"throttled in {throttled:.0%} of periods"
            )
    if busy is not None and busy > MACHINE_MAX_BUSY:
        problems.append(f"machine {busy:.0%} busy: the nodes competed for CPU")
    if figures["requests"] and figures["failed"] / figures["requests"] > MAX_ERROR_RATE:
        problems.append(f"{figures['failed']} of {figures['requests']} requests failed")
    return {
        "n": n,
        **figures,
        "loadgen_cpu_cores": loadgen,
        "machine_busy": busy,
        "nodes": nodes,
        "valid": not problems,
        "problems": problems,
    }


def usl(n: Any, lam: float, sigma: float, kappa: float) -> Any:
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def fit_usl(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Least-squares USL fit over every measured point, with standard errors."""
    import numpy as np
    from scipy.optimize import curve_fit

    ns = np.array([p["n"] for p in points], dtype=float)
    xs = np.array([p["throughput_rps"] for p in points], dtype=float)
    if len(set(ns)) < 3:
        return None  # three parameters need at least three distinct N
    x1 = float(np.mean(xs[ns == ns.min()])) / float(ns.min())
    try:
        params, cov = curve_fit(
            usl, ns, xs, p0=[x1, 0.01, 0.0001], bounds=([0, 0, 0], [np.inf, 1, 1]), maxfev=20000
        )
    except (RuntimeError, ValueError) as exc:
        return {"error": str(exc)}
    errors = np.sqrt(np.clip(np.diag(cov), 0, None))
    return {
        "lambda": float(params[0]),
        "sigma": float(params[1]),
        "kappa": float(params[2]),
        "lambda_stderr": float(errors[0]),
        "sigma_stderr": float(errors[1]),
        "kappa_stderr": float(errors[2]),
        "points": len(points),
    }


def summarize_runs(points: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    by_n: dict[int, list[dict[str, Any]]] = {}
    for point in points:
        by_n.setdefault(point["n"], []).append(point)
    x1 = statistics.fmean(p["throughput_rps"] for p in by_n[min(by_n)]) / min(by_n)
    rows = []
    for n, group in sorted(by_n.items()):
        x = statistics.fmean(p["throughput_rps"] for p in group)
        rows.append(
            {
                "n": n,
                "throughput_rps": x,
                "throughput_runs": [p["throughput_rps"] for p in group],
                "efficiency": x / (n * x1) if x1 else None,
                "p50_ms": statistics.fmean(p["p50_ms"] or 0 for p in group),
                "p95_ms": statistics.fmean(p["p95_ms"] or 0 for p in group),
                "p99_ms": statistics.fmean(p["p99_ms"] or 0 for p in group),
                "loadgen_cpu_cores": max(p["loadgen_cpu_cores"] or 0 for p in group),
                "machine_busy": max(p["machine_busy"] or 0 for p in group),
                "valid": all(p["valid"] for p in group),
            }
        )
    return {
        "plan": asdict(plan),
        "x1_rps": x1,
        "rows": rows,
        "usl": fit_usl(points),
        "valid": all(p["valid"] for p in points),
        "problems": [f"N={p['n']}: {problem}" for p in points for problem in p["problems"]],
        "points": points,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["rows"]
    ns = [r["n"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    for point in report["points"]:
        ax1.plot(point["n"], point["throughput_rps"], "o", color="tab:blue", alpha=0.5)
    ax1.plot(ns, [r["throughput_rps"] for r in rows], "o-", color="tab:blue", label="measured X(N)")
    grid = np.linspace(1, max(ns), 100)
    ax1.plot(grid, grid * report["x1_rps"], "--", color="gray", label="ideal N·X(1)")
    fit = report.get("usl") or {}
    if "lambda" in fit:
        label = f"USL fit σ={fit['sigma']:.4f} κ={fit['kappa']:.5f}"
        ax1.plot(
            grid,
            usl(grid, fit["lambda"], fit["sigma"], fit["kappa"]),
            color="tab:orange",
            label=label,
        )
    ax1.set(xlabel="nodes N", ylabel="requests/s", title="Throughput at saturation")
    ax1.legend()
    ax2.bar([str(n) for n in ns], [r["efficiency"] for r in rows], color="tab:green")
    ax2.axhline(1.0, color="gray", linestyle="--")
    ax2.axhline(0.9, color="tab:red", linestyle=":", label="0.90")
    ax2.set(xlabel="nodes N", ylabel="E(N) = X(N) / (N·X(1))", title="Efficiency", ylim=(0, 1.15))
    ax2.legend()
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax3.plot(ns, [r[key] for r in rows], style, label=key.removesuffix("_ms"))
    ax3.set(xlabel="nodes N", ylabel="ms", title="Latency at saturation")
    ax3.legend()
    verdict = "valid run" if report["valid"] else "INVALID run (see report)"
    fig.suptitle(
        f"cattle scale-out, {report['plan']['cpu']} core per node, {report['plan']['mix']} mix — "
        f"{verdict} — {reports.when(report)}, {report['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    plan, fit = report["plan"], report.get("usl") or {}
    lines = [
        "# Scale-out: throughput against the number of nodes",
        "",
        f"{reports.measured(report)} Reproduce with `{report['command']}`.",
        "",
        f"Each node is capped at **{plan['cpu']} core** (cgroup v1 `cpu`), behind HAProxy, "
        f"on the {plan['backend']} backend; locust drives the **{plan['mix']}** mix with "
        f"{plan['users_per_node']} closed-loop users per node. Throughput is counted over "
        f"{plan['measure_s']:.0f} s after a {plan['warmup_s']:.0f} s warm-up, "
        f"{plan['repeats']} run(s) per N.",
        "",
        f"**Verdict: {'valid' if report['valid'] else 'INVALID'}.**"
        + ("" if report["valid"] else " Problems: " + "; ".join(report["problems"])),
        "",
        "| N | X(N) req/s | runs | E(N) | p50 ms | p95 ms | p99 ms "
        "| load generator cores | machine busy |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        runs = ", ".join(f"{x:.0f}" for x in r["throughput_runs"])
        lines.append(
            f"| {r['n']} | {r['throughput_rps']:.0f} | {runs} | {r['efficiency']:.3f} | "
            f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['loadgen_cpu_cores']:.2f} | {r['machine_busy']:.0%} |"
        )
    lines.append("")
    spreads = [
        (r["n"], (max(r["throughput_runs"]) - min(r["throughput_runs"])) / r["throughput_rps"])
        for r in report["rows"]
        if len(r["throughput_runs"]) > 1 and r["throughput_rps"]
    ]
    if spreads:
        widest_n, widest = max(spreads, key=lambda item: item[1])
        lines += [
            f"Run-to-run spread (max - min over mean) reaches {widest:.0%} (at N={widest_n}): "
            "read E(N) to within that. An E(N) above 1 is noise around linear scaling, "
            "not a fleet that does better than linearly.",
            "",
        ]
    if "lambda" in fit:
        lines += [
            "Universal Scalability Law fit over every run (X(N) = λN / (1 + σ(N−1) + κN(N−1))):",
            "",
            f"- λ = {fit['lambda']:.1f} ± {fit['lambda_stderr']:.1f} req/s per node",
            f"- σ (contention) = {fit['sigma']:.4f} ± {fit['sigma_stderr']:.4f}",
            f"- κ (coherency) = {fit['kappa']:.5f} ± {fit['kappa_stderr']:.5f}",
            "",
        ]
    lines += [
        "![scale-out](scaleout.png)",
        "",
        "Per-node checks (each run): a node counts as saturated when it was throttled in at "
        f"least {NODE_MIN_THROTTLED:.0%} of CFS periods and used at least "
        f"{NODE_MIN_SHARE:.0%} of its cap; the load generator must stay under "
        f"{LOADGEN_MAX_CORES} core and the machine under {MACHINE_MAX_BUSY:.0%} busy.",
        "",
    ]
    return "\n".join(lines)


def run(plan: Plan, command: str) -> dict[str, Any]:
    """Every N of the plan, `repeats` times over; the report (written by the caller)."""
    base = Path(tempfile.mkdtemp(prefix="cattle-scaleout-", dir="/tmp"))
    base.chmod(0o755)
    points = []
    try:
        for repeat in range(plan.repeats):
            for n in plan.ns:
                started = time.monotonic()
                point = measure(n, plan, base / f"n{n}-r{repeat}")
                points.append(point)
                print(
                    f"N={n} run {repeat + 1}: {point['throughput_rps']:.0f} req/s, "
                    f"loadgen {point['loadgen_cpu_cores'] or 0:.2f} cores, "
                    f"{'valid' if point['valid'] else 'INVALID: ' + '; '.join(point['problems'])} "
                    f"({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return reports.stamped(command, summarize_runs(points, plan))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.experiments.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long run of the code path")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="writes OUT.json, OUT.md and OUT.png"
    )
    parser.add_argument("--cpu", type=float, help="cap per node (fraction of a core)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT.md and OUT.png from OUT.json"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    if args.cpu is not None:
        plan = Plan(**{**asdict(plan), "cpu": args.cpu})
    if args.repeats is not None:
        plan = Plan(**{**asdict(plan), "repeats": args.repeats})
    command = reports.command_line(__spec__.name, argv)
    report = reports.main(
        "scaleout",
        args.out,
        render_only=args.render,
        measure=lambda: run(plan, command),
        markdown=markdown,
        plot=plot,
        lock=not args.smoke,  # a smoke run checks the code, not the machine
    )
    if report is None:
        return 0
    for row in report["rows"]:
        print(f"N={row['n']}: X={row['throughput_rps']:.0f} req/s  E={row['efficiency']:.3f}")
    print(f"{'valid' if report['valid'] else 'INVALID'}; report in {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
