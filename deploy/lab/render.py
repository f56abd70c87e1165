"""Render a config template under deploy/: `${name}` placeholders, nothing else.

Configs for real components stay readable files; a missing value is an error,
not an empty string in a config that then half-works.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

DEPLOY_DIR = Path(__file__).resolve().parents[1]


def render(template: str | Path, **values: object) -> str:
    path = Path(template)
    if not path.is_absolute():
        path = DEPLOY_DIR / path
    try:
        return Template(path.read_text()).substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise KeyError(f"{path.name} needs a value for {exc.args[0]!r}") from None
