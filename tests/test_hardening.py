"""The hardening table (docs/results/hardening.md) is the committed result
rendered, and docs/hardening.md shows it (tests/hardening.py records it)."""

from __future__ import annotations

import json

from tests import hardening


def test_the_table_is_the_committed_result_rendered() -> None:
    result = json.loads(hardening.RESULT_JSON.read_text())
    assert hardening.RESULT_MD.read_text() == hardening.render(result), (
        "docs/results/hardening.md is not docs/results/hardening.json rendered; "
        "run `make hardening-report`"
    )
    keys = [hardening.Case(**case).key for case in result["cases"]]
    assert len(keys) == len(set(keys)), "a case is in the result twice"


def test_the_docs_show_the_table() -> None:
    page = (hardening.REPO / "docs/hardening.md").read_text()
    assert "<!-- include: docs/results/hardening.md -->" in page
