"""A schemathesis hook for tests/system/test_schemathesis.py: a case labelled
positive whose headers do not match the spec is checked as a negative case.

Why: schemathesis's coverage phase builds a header value only from letters
and digits, so it finds no valid Consistency-Token (`w1.<hex>` needs the
dot). It then seeds the header with a value it knows is invalid (the number
0) and still labels cases built on that seed "positive" (in some of them the
case's own metadata even records the header as negative), so
positive_data_acceptance reports the node's 400 for `Consistency-Token: 0`
as a valid request rejected. This hook checks each header the case sends
against the parameter's schema in the spec; when one does not match, the
request is not valid data, and the negative checks (which expect a 4xx)
judge it instead. A case whose headers match keeps its label and every check.
"""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import schemathesis
from schemathesis.generation import GenerationMode


def _header_matches(schema: Any, value: Any) -> bool:
    if not isinstance(schema, dict):
        return True
    return bool(jsonschema_rs.validator_for(schema).is_valid(str(value)))


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return
    sent = {name.lower(): value for name, value in (case.headers or {}).items()}
    for parameter in case.operation.headers:
        value = sent.get(parameter.name.lower())
        if value is not None and not _header_matches(parameter.definition.get("schema"), value):
            meta.generation.mode = GenerationMode.NEGATIVE
            return
