"""loadtests.capacity on a small fixture fit: the answer, its band, N*, and its errors (no nodes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtests import capacity
from loadtests.harness.usl import band, usl

FIXTURE = Path(__file__).with_name("capacity_fit.json")


def _fit() -> dict:
    return json.loads(FIXTURE.read_text())


def _write(tmp_path: Path, report: dict) -> Path:
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(report))
    return path


def _first_reaching(target: float, lam: float, sigma: float, kappa: float) -> int:
    return next(n for n in range(1, 1000) if usl(n, lam, sigma, kappa) >= target)


def test_answers_the_nodes_the_fit_needs_with_its_band(capsys):
    assert capacity.main(["--target-rps", "500", "--fit", str(FIXTURE)]) == 0
    fit = _fit()["usl"]
    needed = _first_reaching(500, fit["lambda"], fit["sigma"], fit["kappa"])
    result = capacity.answer(fit, 500)
    assert result["nodes"] == needed
    fewest, most = result["nodes_band"]
    assert fewest <= needed <= most
    assert fewest < most  # the fixture's uncertainty is not zero: the band says so
    low, high = result["predicted_band"]
    assert low <= result["predicted_rps"] <= high
    out = capsys.readouterr().out
    assert f"Nodes needed: {needed} (over the fit's 95% band: {fewest} to {most})" in out
    assert "past the largest N measured (8)" in out
    assert "Trust: fitted on N = [1, 2, 4]" in out


def test_says_where_adding_nodes_stops_paying(capsys):
    assert capacity.main(["--target-rps", "100", "--fit", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "stops paying past N* = 31 " in out  # sqrt(0.98 / 0.001) = 31.3
    # A small target within the measured range is no extrapolation.
    assert "past the largest N measured" not in out


def test_no_peak_when_kappa_is_zero(tmp_path, capsys):
    report = _fit()
    report["usl"] |= {"kappa": 0.0, "covariance": [[2.5e-05, 0.0], [0.0, 0.0]]}
    assert capacity.main(["--target-rps", "500", "--fit", str(_write(tmp_path, report))]) == 0
    assert "at no N within 1000" in capsys.readouterr().out
    assert capacity.answer(report["usl"], 500)["peak_n"] is None


def test_a_target_past_the_peak_is_not_reachable(capsys):
    fit = _fit()["usl"]
    peak = math.sqrt((1 - fit["sigma"]) / fit["kappa"])
    best = usl(peak, fit["lambda"], fit["sigma"], fit["kappa"])
    assert capacity.main(["--target-rps", str(round(best * 1.5)), "--fit", str(FIXTURE)]) == 1
    out = capsys.readouterr().out
    assert "Not reachable with nodes of this size" in out
    assert f"peaks at {best:.0f} req/s" in out


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        capacity.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("rate", ["0", "-5", "fast", "nan", "inf"])
def test_a_bad_rate_is_refused_with_what_to_give(rate, capsys):
    err = _error(["--target-rps", rate, "--fit", str(FIXTURE)], capsys)
    assert "give requests per second as a positive number, e.g. 500" in err


def test_a_missing_fit_says_how_to_make_one(tmp_path, capsys):
    err = _error(["--target-rps", "500", "--fit", str(tmp_path / "none.json")], capsys)
    assert "no fit at" in err
    assert "python -m loadtests.experiments.scaleout" in err


def test_a_fit_that_is_not_json_is_refused(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text("{not json")
    err = _error(["--target-rps", "500", "--fit", str(path)], capsys)
    assert "is not JSON (line 1" in err


def test_a_fit_from_before_the_paired_runs_is_refused(tmp_path, capsys):
    report = _fit()
    # The layout of a fit over every run at every N, with standard errors only.
    for key in ("covariance", "fit_ns", "node_cpu"):
        del report["usl"][key]
    err = _error(["--target-rps", "500", "--fit", str(_write(tmp_path, report))], capsys)
    assert "lacks covariance, fit_ns, node_cpu: it predates the paired runs" in err


def test_a_run_without_a_fit_is_refused(tmp_path, capsys):
    report = _fit() | {"usl": {"error": "the fit needs pairs at N = [2, 4]"}}
    err = _error(["--target-rps", "500", "--fit", str(_write(tmp_path, report))], capsys)
    assert "holds no USL fit (the fit needs pairs at N = [2, 4])" in err


def test_an_invalid_run_plans_only_when_asked(tmp_path, capsys):
    report = _fit() | {"valid": False, "problems": ["N=8: the repeats disagree"]}
    path = str(_write(tmp_path, report))
    err = _error(["--target-rps", "500", "--fit", path], capsys)
    assert "is not valid (N=8: the repeats disagree)" in err
    assert "--accept-invalid" in err
    assert capacity.main(["--target-rps", "500", "--fit", path, "--accept-invalid"]) == 0
    assert "WARNING: the run behind this fit is not valid" in capsys.readouterr().out


def test_a_fit_on_its_bounds_has_a_band_that_holds_its_own_prediction() -> None:
    # sigma = kappa = 0, as a run whose E(N) came out at 1 fits: every draw is
    # clipped to >= 0 and, sigma and kappa drawn anti-correlated (as fits give them), next to
    # none lands on both bounds: plain percentiles of the draws fall below the prediction.
    fit = _fit()["usl"] | {
        "sigma": 0.0,
        "kappa": 0.0,
        "covariance": [[5.87e-3, -1.478e-3], [-1.478e-3, 3.74e-4]],
    }
    predicted = usl(8, fit["lambda"], 0.0, 0.0)
    low, high = band(fit, 8)
    assert low < predicted <= high
    result = capacity.answer(fit, predicted * 0.99)
    low, high = result["predicted_band"]
    assert low < result["predicted_rps"] <= high
