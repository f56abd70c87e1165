"""Idempotency keys: a retried request replays the first response instead of acting twice.

Routes use one entry point, `http.IdempotentWriteDep`; `service` holds the
claim/complete/release protocol under it and `models` the table, whose
migrations are this package's own branch (`migrations/`).
"""
