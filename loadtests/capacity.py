"""How many nodes of the measured size a target request rate needs, from the committed fit.

Reads the Universal Scalability Law fit the scale-out experiment writes
(docs/results/scaleout-balanced.json, the defaults' run, valid over its
blocks: fitted on N = 1, 2, 4, checked against a measured N = 8) and answers with
the fit's uncertainty: the node count its central curve needs, the range
over its 95% band (the standard errors of X(1), sigma and kappa, drawn
jointly), and the N past which the fit says adding nodes lowers throughput
(N* = sqrt((1 - sigma) / kappa)).

    python -m loadtests.capacity --target-rps 500
    python -m loadtests.capacity --target-rps 500 --fit other-run.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from loadtests import REPO_ROOT
from loadtests import report as reports
from loadtests.harness.usl import bands, peak_n, usl

FIT = reports.RESULTS / "scaleout-balanced.json"
MAX_NODES = 1000
RERUN = "python -m loadtests.experiments.scaleout"
# What a fit needs for planning (loadtests/experiments/scaleout.py, usl_check).
FIT_KEYS = ("lambda", "lambda_stderr", "sigma", "kappa", "covariance", "fit_ns", "node_cpu")


class FitError(ValueError):
    """The fit file cannot be planned with; the message says why and what to do."""


def load_fit(path: Path, *, accept_invalid: bool = False) -> dict[str, Any]:
    """The report at `path`, checked to hold a USL fit from a valid run of paired N."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FitError(
            f"no fit at {path}: run `{RERUN}` (it writes {FIT.relative_to(REPO_ROOT)}), "
            "or give --fit PATH to a scale-out report"
        ) from None
    except OSError as exc:
        raise FitError(f"cannot read {path}: {exc.strerror}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FitError(
            f"{path} is not JSON (line {exc.lineno}: {exc.msg}): give --fit the .json a "
            f"scale-out run wrote, or rerun `{RERUN}`"
        ) from None
    fit = report.get("usl") if isinstance(report, dict) else None
    if not isinstance(fit, dict) or "error" in fit:
        why = fit["error"] if isinstance(fit, dict) else "it has no 'usl' block"
        raise FitError(f"{path} holds no USL fit ({why}): rerun `{RERUN}` with N = 1, 2, 4, 8")
    missing = [key for key in FIT_KEYS if fit.get(key) is None]
    if missing:
        raise FitError(
            f"{path}'s fit lacks {', '.join(missing)}: it predates the paired runs "
            f"(a fit on N = 1, 2, 4 with its covariance); rerun `{RERUN}`"
        )
    if not report.get("valid") and not accept_invalid:
        problems = "; ".join(report.get("problems") or []) or "no reason recorded"
        raise FitError(
            f"the run behind {path} is not valid ({problems}): plan with a valid run, "
            "or pass --accept-invalid to see what this one would say"
        )
    return dict(report)


def answer(fit: dict[str, Any], target_rps: float, max_nodes: int = MAX_NODES) -> dict[str, Any]:
    """Nodes the central fit needs for `target_rps`, the range over its 95% band, and N*."""
    import numpy as np

    ns = np.arange(1, max_nodes + 1, dtype=float)
    central = usl(ns, fit["lambda"], fit["sigma"], fit["kappa"])
    low, high = bands(fit, ns, fit["lambda_stderr"])

    def first(values: Any) -> int | None:
        reached = np.nonzero(values >= target_rps)[0]
        return int(reached[0]) + 1 if len(reached) else None

    nodes = first(central)
    peak = peak_n(fit["sigma"], fit["kappa"])
    best = int(np.argmax(central))
    return {
        "target_rps": target_rps,
        "nodes": nodes,
        "predicted_rps": float(central[nodes - 1]) if nodes else None,
        "predicted_band": [float(low[nodes - 1]), float(high[nodes - 1])] if nodes else None,
        # Over the band: the optimistic end reaches the target first.
        "nodes_band": [first(high), first(low)],
        "peak_n": peak if peak is not None and peak <= max_nodes else None,
        "best_rps": float(central[best]),
        "best_n": best + 1,
        "max_nodes": max_nodes,
    }


def describe(report: dict[str, Any], result: dict[str, Any], path: Path) -> str:
    """The answer for reading."""
    fit = report["usl"]
    source = f"fit in {path}"
    if report.get("date"):
        source += f", measured {report['date']}"
    if report.get("commit"):
        source += f" at commit {report['commit']}"
    lines = [
        f"Target {result['target_rps']:g} req/s with nodes of {fit['node_cpu']:g} core "
        f"({source}; fitted on N = {fit['fit_ns']}).",
    ]
    if not report.get("valid"):
        lines.append("WARNING: the run behind this fit is not valid (--accept-invalid).")
    fewest, most = result["nodes_band"]
    if result["nodes"] is None:
        lines.append(
            f"Not reachable with nodes of this size within {result['max_nodes']} nodes: the "
            f"fit peaks at {result['best_rps']:.0f} req/s with {result['best_n']} nodes."
        )
    else:
        low, high = result["predicted_band"]
        top = f"{most}" if most is not None else f"more than {result['max_nodes']}"
        lines.append(
            f"Nodes needed: {result['nodes']} (over the fit's 95% band: {fewest} to {top}); "
            f"the fit gives X({result['nodes']}) = {result['predicted_rps']:.0f} req/s "
            f"(band {low:.0f} – {high:.0f})."
        )
    if result["peak_n"] is None:
        lines.append(
            f"Adding nodes stops paying: at no N within {result['max_nodes']} "
            f"(κ = {fit['kappa']:.2g}: no peak in range)."
        )
    else:
        lines.append(
            f"Adding nodes stops paying past N* = {result['peak_n']:.0f} "
            f"(sqrt((1 - σ) / κ), σ = {fit['sigma']:.3g}, κ = {fit['kappa']:.3g})."
        )
    check = fit.get("check")
    largest = fit.get("largest_measured_n")
    if check and check.get("relative_error") is not None:
        lines.append(
            f"Trust: fitted on N = {fit['fit_ns']}, the fit predicted the measured "
            f"X({check['n']}) to within {check['relative_error']:+.1%}."
        )
    if largest and result["nodes"] and result["nodes"] > largest:
        lines.append(
            f"{result['nodes']} nodes is past the largest N measured ({largest}): an "
            "extrapolation, as good as the fit's form is for this service."
        )
    return "\n".join(lines)


def _target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: give requests per second as a positive number, e.g. 500"
        )
    return value


def _max_nodes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of nodes, at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target-rps", type=_target, required=True, help="requests/s to serve")
    parser.add_argument(
        "--fit", type=Path, default=FIT, help=f"a scale-out report (default {FIT.name})"
    )
    parser.add_argument(
        "--max-nodes", type=_max_nodes, default=MAX_NODES, help="the largest fleet to consider"
    )
    parser.add_argument(
        "--accept-invalid", action="store_true", help="answer from a run that is not valid"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = load_fit(args.fit, accept_invalid=args.accept_invalid)
    except FitError as exc:
        parser.error(str(exc))
    result = answer(report["usl"], args.target_rps, args.max_nodes)
    print(describe(report, result, args.fit))
    return 0 if result["nodes"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
