"""Load tests: the locust clients, the harness that runs them, experiments and benchmarks.

clients/      the example domain's locust users (HTTP only, never service/)
harness/      running locust, sampling CPU, the machine lock, wrk, machine facts
experiments/  scale-out, node loss, failover: a lab under load, then an audit
benchmarks/   one node's efficiency and telemetry cost, with their baselines
report.py     the one writer of every result file in docs/results/
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
