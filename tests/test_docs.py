"""Docs show configuration files as they are: a block between
`<!-- include: path -->` and `<!-- end include -->` must be that file, verbatim.

`DOCS_WRITE=1 pytest tests/test_docs.py` rewrites the blocks from the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(
    r"(?P<open><!-- include: (?P<path>\S+) -->\n)(?P<body>.*?)(?P<close><!-- end include -->)",
    re.DOTALL,
)
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])


def _rendered(match: re.Match[str]) -> str:
    text = (REPO / match["path"]).read_text()
    return f"{match['open']}```\n{text.rstrip()}\n```\n{match['close']}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_included_files_are_shown_verbatim(doc: Path) -> None:
    text = doc.read_text()
    expected = INCLUDE.sub(_rendered, text)
    if expected != text and os.environ.get("DOCS_WRITE"):
        doc.write_text(expected)
        return
    assert expected == text, (
        f"{doc.relative_to(REPO)} shows an included file that has changed; "
        "run `DOCS_WRITE=1 .venv/bin/python -m pytest tests/test_docs.py` to refresh it"
    )


def test_every_include_names_a_file_of_the_repo() -> None:
    for doc in DOCS:
        for match in INCLUDE.finditer(doc.read_text()):
            assert (REPO / match["path"]).is_file(), f"{doc.name}: no file {match['path']}"
