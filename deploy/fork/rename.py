"""Rename a freshly rendered copy of the template: its name and default port.

copier runs this as a task after every render, in the fork and in the scratch
copies an update compares (copier.yml), so all of them carry the fork's name
and `copier update` sees only real changes. It reads the template's name from
service/__init__.py (NAME) and its port from service/config.py, and replaces
the name in every text file (as `name`, `Name` and `NAME`, in file names too)
and the port where it is the service's port. A tree already carrying the new
name is left alone, so running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

NAME_RULE = re.compile(r"[a-z][a-z0-9]{1,29}")
NAME_LINE = re.compile(r'^NAME = "([a-z][a-z0-9]*)"$', re.M)
PORT_LINE = re.compile(r"^    port: int = Field\(default=(\d+),", re.M)
# Never rewritten: the answers file (copier's own record), git's data,
# environments and caches.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".venv",
        "__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".import_linter_cache",
        ".grimp_cache",
        ".hypothesis",
        "var",
        "run",
    }
)
SKIP_FILES = frozenset({".copier-answers.yml"})
# The port is also a plain number: it is left alone where it means something
# else (tests choose their own, measured results record what was measured,
# the lock holds hashes).
PORT_SKIP = ("tests/", "docs/results/", "uv.lock")


class RenameError(ValueError):
    """A name or port the tool refuses, or a tree it cannot read."""


def credit(template: str) -> str:
    """The line that names the template in the fork's README (kept by every rename)."""
    return (
        f"This service was forked from the {template} template "
        "(`.copier-answers.yml` records the version; docs/forking.md: updates)."
    )


def template_name(root: Path) -> str:
    found = NAME_LINE.search((root / "service/__init__.py").read_text())
    if not found:
        raise RenameError('service/__init__.py has no NAME = "..." line')
    return found.group(1)


def template_port(root: Path) -> int:
    found = PORT_LINE.search((root / "service/config.py").read_text())
    if not found:
        raise RenameError("service/config.py has no `port: int = Field(default=...` line")
    return int(found.group(1))


def text_files(root: Path) -> list[Path]:
    files = []
    # Skipped folders are not entered at all: a fork's .venv alone holds tens
    # of thousands of files.
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in names:
            path = Path(folder, name)
            if name in SKIP_FILES or path.is_symlink() or not path.is_file():
                continue
            files.append(path)
    return sorted(files)


def rename_text(text: str, old: str, new: str, *, keep: str) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if keep in line:
            continue
        for before, after in (
            (old, new),
            (old.capitalize(), new.capitalize()),
            (old.upper(), new.upper()),
        ):
            line = line.replace(before, after)
        lines[i] = line
    return "\n".join(lines)


def rename(root: Path, name: str, port: int) -> list[Path]:
    """Rename the tree at `root`; the files changed (or moved)."""
    if not NAME_RULE.fullmatch(name):
        raise RenameError(
            f"{name!r}: a service name is 2-30 lowercase letters and digits, starting with a "
            "letter (it becomes the env prefix, metric names and problem URNs)"
        )
    if not 1 <= port <= 65535:
        raise RenameError(f"{port}: not a TCP port")
    old = template_name(root)
    if old == name:
        return []  # already this service (or the template itself)
    if old in name:
        raise RenameError(f"{name!r} contains the template's name {old!r}: pick another")
    old_port = template_port(root)
    keep = credit(old)
    port_word = re.compile(rf"(?<![\w.]){old_port}(?!\w|\.\d)")
    changed: list[Path] = []
    for path in text_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        posix = path.relative_to(root).as_posix()
        new_text = rename_text(text, old, name, keep=keep)
        if port != old_port and not posix.startswith(PORT_SKIP):
            new_text = port_word.sub(str(port), new_text)
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            changed.append(path)
    for path in text_files(root):  # then the paths carrying the name
        moved = Path(rename_text(path.relative_to(root).as_posix(), old, name, keep=keep))
        if moved != path.relative_to(root):
            (root / moved).parent.mkdir(parents=True, exist_ok=True)
            path.rename(root / moved)
            changed.append(root / moved)
    readme = root / "README.md"
    if readme.exists() and keep not in readme.read_text():
        head, _, rest = readme.read_text().partition("\n")
        readme.write_text(f"{head}\n\n{keep}\n{rest}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.fork.rename", description=__doc__)
    parser.add_argument("--name", required=True, help="the fork's service name")
    parser.add_argument("--port", type=int, required=True, help="its default port")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the copy (default: .)")
    args = parser.parse_args(argv)
    try:
        changed = rename(args.root, args.name, args.port)
    except (RenameError, OSError) as exc:
        print(f"rename: {exc}", file=sys.stderr)
        return 1
    print(f"rename: {len(changed)} files now say {args.name} (port {args.port})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
