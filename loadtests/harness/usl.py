"""The Universal Scalability Law: fitting it, and what a fit predicts with its uncertainty.

X(N) = lambda N / (1 + sigma (N-1) + kappa N (N-1)): sigma is the share of work
that contends (queues on something shared), kappa the cost of keeping N
nodes coherent with one another. With kappa > 0 throughput peaks at
N* = sqrt((1 - sigma) / kappa) and falls beyond it.
"""

from __future__ import annotations

import math
from typing import Any

# A kappa this small puts the peak beyond any fleet worth planning.
KAPPA_ZERO = 1e-9
DRAWS = 4000


def usl(n: Any, lam: float, sigma: float, kappa: float) -> Any:
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def fit_usl(points: list[dict[str, Any]], lam: float | None = None) -> dict[str, Any] | None:
    """Least-squares USL fit of `points` ({"n", "throughput_rps"}) with standard errors.

    With `lam` given, lambda is held there and only sigma and kappa are
    fitted (two distinct N suffice): fitting capacities relative to N=1
    (lam=1) keeps the machine's drift out of the fit. The covariance of the
    fitted parameters comes back too, for prediction bands.
    """
    import numpy as np
    from scipy.optimize import curve_fit

    ns = np.array([p["n"] for p in points], dtype=float)
    xs = np.array([p["throughput_rps"] for p in points], dtype=float)
    if len(set(ns)) < (3 if lam is None else 2):
        return None  # as many distinct N as free parameters, at least
    try:
        if lam is None:
            x1 = float(np.mean(xs[ns == ns.min()])) / float(ns.min())
            params, cov = curve_fit(
                usl, ns, xs, p0=[x1, 0.01, 0.0001], bounds=([0, 0, 0], [np.inf, 1, 1]), maxfev=20000
            )
        else:
            held = float(lam)
            params, cov = curve_fit(
                lambda n, sigma, kappa: usl(n, held, sigma, kappa),
                ns,
                xs,
                p0=[0.01, 0.0001],
                bounds=([0, 0], [1, 1]),
                maxfev=20000,
            )
            params = np.concatenate([[held], params])
            full = np.zeros((3, 3))
            full[1:, 1:] = cov
            cov = full
    except (RuntimeError, ValueError) as exc:
        return {"error": str(exc)}
    finite = bool(np.all(np.isfinite(cov)))
    errors = np.sqrt(np.clip(np.diag(cov), 0, None)) if finite else [math.nan] * 3
    return {
        "lambda": float(params[0]),
        "sigma": float(params[1]),
        "kappa": float(params[2]),
        "lambda_stderr": float(errors[0]) if finite else None,
        "sigma_stderr": float(errors[1]) if finite else None,
        "kappa_stderr": float(errors[2]) if finite else None,
        # sigma and kappa's 2x2 covariance (None when the points fix them exactly).
        "covariance": cov[1:, 1:].tolist() if finite else None,
        "points": len(points),
    }


def peak_n(sigma: float, kappa: float) -> float | None:
    """N* past which adding nodes lowers throughput; None when kappa is about 0."""
    if kappa <= KAPPA_ZERO:
        return None
    return math.sqrt(max(0.0, 1 - sigma) / kappa)


def draws(
    fit: dict[str, Any], x1_stderr: float = 0.0, count: int = DRAWS, seed: int = 0
) -> tuple[Any, Any, Any]:
    """(lambda, sigma, kappa) arrays drawn from the fit's uncertainty (fixed seed).

    sigma and kappa come from their covariance (clipped to their bounds),
    lambda from a normal of `x1_stderr` around the fit's lambda.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    centre = np.array([fit["sigma"], fit["kappa"]])
    cov = np.array(fit["covariance"] or [[0.0, 0.0], [0.0, 0.0]], dtype=float)
    pairs = rng.multivariate_normal(centre, cov, size=count, check_valid="ignore")
    sigma = np.clip(pairs[:, 0], 0.0, 1.0)
    kappa = np.clip(pairs[:, 1], 0.0, 1.0)
    lam = np.clip(rng.normal(fit["lambda"], x1_stderr, size=count), 0.0, None)
    return lam, sigma, kappa


def bands(
    fit: dict[str, Any], ns: Any, x1_stderr: float = 0.0, confidence: float = 0.95
) -> tuple[Any, Any]:
    """The central `confidence` band of X(n) at each n of `ns` over the fit's
    uncertainty (two arrays), stretched to hold the fit's own X(n).

    A fit on a bound (sigma or kappa 0) has its draws clipped to that bound, so
    they all fall on one side of it: the percentiles alone could leave out the
    very prediction they bound.
    """
    import numpy as np

    ns = np.asarray(ns, dtype=float)
    lam, sigma, kappa = draws(fit, x1_stderr)
    curves = usl(ns[None, :], lam[:, None], sigma[:, None], kappa[:, None])
    tail = (1 - confidence) / 2 * 100
    central = usl(ns, fit["lambda"], fit["sigma"], fit["kappa"])
    low = np.minimum(np.percentile(curves, tail, axis=0), central)
    high = np.maximum(np.percentile(curves, 100 - tail, axis=0), central)
    return low, high


def band(
    fit: dict[str, Any], n: float, x1_stderr: float = 0.0, confidence: float = 0.95
) -> tuple[float, float]:
    """`bands` at one n."""
    low, high = bands(fit, [n], x1_stderr, confidence)
    return float(low[0]), float(high[0])
