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


def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.lab.render TEMPLATE name=value...`: the rendered file on stdout.

    For operators rendering the same templates the lab uses onto a real host
    (docs/operations.md, "Anycast"); a missing value fails, never renders empty.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in a for a in args[1:]):
        print("usage: python -m deploy.lab.render TEMPLATE name=value...", file=sys.stderr)
        return 2
    values = dict(a.split("=", 1) for a in args[1:])
    try:
        sys.stdout.write(render(args[0], **values))
    except (KeyError, OSError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
