"""Benchmarks of one node pinned to a core: efficiency against bare frameworks, telemetry cost."""
