"""Idempotency keys: a retried request replays the first response instead of acting twice."""
