"""`python -m deploy.fork copy|update|check`: copier, plus the checks copier leaves out.

copier exits 0 even when an update left conflicts (inline markers, .rej
files) or failed half-way, so every command here ends by checking the fork:
no conflict markers in any file, no .rej file, no unmerged path in git.
Anything found is listed and the exit status is 1.

  python -m deploy.fork copy ../herd --name herd [--port 8000] [--ref v0.2.0]
  python -m deploy.fork update [../herd] [--ref v0.3.0]     (in a fork: make fork-update)
  python -m deploy.fork check [../herd]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2]
MARKER = re.compile(rb"^(<{7} |>{7} |={7}$)", re.M)
SKIP_DIRS = frozenset({".git", ".venv", "node_modules"})


def copier() -> str:
    found = shutil.which("copier") or str(Path(sys.executable).parent / "copier")
    if not Path(found).exists():
        raise SystemExit("fork: copier not found (it is in the dev group: make venv)")
    return found


def leftovers(dest: Path) -> list[str]:
    """Conflict markers, .rej files and unmerged paths left in `dest`."""
    found = []
    for path in sorted(dest.rglob("*")):
        relative = path.relative_to(dest)
        if set(relative.parts) & SKIP_DIRS or not path.is_file() or path.is_symlink():
            continue
        if path.suffix == ".rej":
            found.append(f"{relative}: rejected hunks")
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for match in MARKER.finditer(data):
            line = data.count(b"\n", 0, match.start()) + 1
            found.append(f"{relative}:{line}: conflict marker")
            break
    if (dest / ".git").exists():
        unmerged = _git(dest, "diff", "--name-only", "--diff-filter=U").stdout.split()
        found += [f"{path}: unmerged in git" for path in unmerged]
    return found


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, check=False
    )


def dirty(template: Path) -> bool:
    status = _git(template, "status", "--porcelain", "--untracked-files=normal")
    return status.returncode == 0 and bool(status.stdout.strip())


def run_copier(args: list[str]) -> int:
    return subprocess.run([copier(), *args], timeout=900, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.fork",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    copy = commands.add_parser("copy", help="make a named copy of the template")
    copy.add_argument("dest", type=Path)
    copy.add_argument("--name", required=True, help="the service's name (env prefix, metrics...)")
    copy.add_argument("--port", type=int, default=None, help="its default port")
    copy.add_argument("--src", default=str(TEMPLATE), help="template: a path or git URL")
    copy.add_argument("--ref", default=None, help="template version (a git tag; default: latest)")
    update = commands.add_parser("update", help="replay the fork's changes onto a newer template")
    update.add_argument("dest", type=Path, nargs="?", default=Path.cwd())
    update.add_argument("--ref", default=None, help="template version (default: latest tag)")
    check = commands.add_parser("check", help="only look for conflict leftovers")
    check.add_argument("dest", type=Path, nargs="?", default=Path.cwd())
    args = parser.parse_args(argv)

    dest = args.dest.resolve()
    if args.command == "copy":
        # An absolute path: a relative one breaks every later update.
        src = args.src if "://" in args.src else str(Path(args.src).resolve())
        if "://" not in src and dirty(Path(src)):
            # copier would copy the uncommitted files and record a commit the
            # template never had: the fork could not be updated later.
            print(
                f"fork: the template at {src} has uncommitted changes: commit them, "
                "or fork from a clean clone or a git URL",
                file=sys.stderr,
            )
            return 2
        data = ["--data", f"service_name={args.name}"]
        if args.port is not None:
            data += ["--data", f"port={args.port}"]
        ref = ["--vcs-ref", args.ref] if args.ref else []
        code = run_copier(["copy", "--trust", "--defaults", *data, *ref, src, str(dest)])
    elif args.command == "update":
        ref = ["--vcs-ref", args.ref] if args.ref else []
        code = run_copier(
            ["update", "--trust", "--defaults", "--conflict", "inline", *ref, str(dest)]
        )
    else:
        code = 0
    found = leftovers(dest) if dest.exists() else []
    for line in found:
        print(f"fork: {line}", file=sys.stderr)
    if code != 0:
        print(f"fork: copier exited {code}", file=sys.stderr)
        return code
    if found:
        print(f"fork: {len(found)} conflicts left: resolve them, then commit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
