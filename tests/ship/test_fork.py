"""The fork drill: copy the template under a new name, change the fork, release a
new template version, update the fork, and keep it green.

The template is this repository's committed HEAD (git archive), tagged v0.1.0
in a scratch git repository; the fork tool (deploy/fork) runs copier on it.
One drill per module: the fork's own `make test-fast` (its own venv, from the
warm uv cache) is the slow part.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import service
from deploy.fork import rename
from tests.ship.images import REPO
from tests.support import require

FORK_NAME = "zebu"  # not "herd": tests/config/test_name.py renames to that itself
FORK_PORT = 9000
OLD = service.NAME
GIT = [
    "git",
    "-c",
    "user.name=drill",
    "-c",
    "user.email=drill@localhost",
    "-c",
    "commit.gpgsign=false",
]


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [*GIT, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def fork_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.fork", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def clean_env() -> dict[str, str]:
    """The fork runs on its own: no venv, settings or test state of this run leak in."""
    prefix = service.ENV_PREFIX
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith((prefix, "VIRTUAL_ENV", "PYTEST_", "UV_PROJECT"))
    }


def run_in(fork: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`argv` in the fork, on its own (clean_env), output captured."""
    return subprocess.run(
        list(argv), cwd=fork, env=clean_env(), capture_output=True, text=True, timeout=900,
        check=False,
    )  # fmt: skip


def make(fork: Path, target: str) -> subprocess.CompletedProcess[str]:
    # Without compiling every dependency's bytecode at install (13 s here): the
    # fork's fast suite runs in one process, which compiles what it imports.
    return run_in(fork, "make", target, "UV_COMPILE_BYTECODE=0")


def mentions_of_old_name(root: Path) -> list[str]:
    keep = rename.credit(OLD)
    found = []
    for path in rename.text_files(root):
        if path.name == ".copier-answers.yml":
            continue
        relative = path.relative_to(root).as_posix()
        if OLD in relative.lower():
            found.append(relative)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OLD in line.lower() and keep not in line:
                found.append(f"{relative}:{number}: {line.strip()[:100]}")
    return found


@dataclass
class Drill:
    template: Path
    fork: Path


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    require(shutil.which("git") is not None, "git not installed")
    require(shutil.which("make") is not None, "make not installed")
    base = tmp_path_factory.mktemp("fork-drill")
    template = base / "template"
    template.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(template)], input=archive, timeout=120, check=True)
    git(template, "init", "-q", "-b", "main")
    git(template, "add", "-A")
    git(template, "commit", "-q", "-m", "template 0.1.0")
    git(template, "tag", "v0.1.0")
    fork = base / FORK_NAME
    done = fork_tool(
        "copy", str(fork), "--name", FORK_NAME, "--port", str(FORK_PORT), "--src", str(template)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    git(fork, "init", "-q", "-b", "main")
    git(fork, "add", "-A")
    git(fork, "commit", "-q", "-m", "fork")
    # mypy's cache of this checkout (git ignores it): the fork's lint then
    # checks again only the modules the rename changed, not all of them.
    if (REPO / ".mypy_cache").is_dir():
        shutil.copytree(REPO / ".mypy_cache", fork / ".mypy_cache")
    yield Drill(template, fork)
    shutil.rmtree(base, ignore_errors=True)


def test_the_copy_carries_the_new_name_and_port_only(drill: Drill) -> None:
    fork = drill.fork
    assert f'NAME = "{FORK_NAME}"' in (fork / "service/__init__.py").read_text()
    assert f"default={FORK_PORT}," in (fork / "service/config.py").read_text()
    assert f"EXPOSE {FORK_PORT}" in (fork / "Dockerfile").read_text()
    assert mentions_of_old_name(fork) == []
    assert rename.credit(OLD) in (fork / "README.md").read_text()  # the one credit
    answers = (fork / ".copier-answers.yml").read_text()
    assert f"service_name: {FORK_NAME}" in answers and "_commit: v0.1.0" in answers
    assert not (fork / "copier.yml").exists()


@pytest.mark.timeout(900)
def test_the_fork_passes_its_own_fast_suite(drill: Drill) -> None:
    done = make(drill.fork, "test-fast")
    # pytest's failures and summary are on stdout; the nodes' OTLP retries fill stderr.
    assert done.returncode == 0, done.stdout[-4000:] + "\n--- stderr ---\n" + done.stderr[-1000:]
    assert re.search(r"\d+ passed", done.stdout)


@pytest.mark.timeout(900)
def test_an_update_brings_the_template_change_and_keeps_the_forks_own(drill: Drill) -> None:
    template, fork = drill.template, drill.fork
    # The fork's own change.
    readme = fork / "README.md"
    readme.write_text(
        readme.read_text() + f"\n## Our team\n\n{FORK_NAME} is run by the pasture team.\n"
    )
    git(fork, "commit", "-q", "-am", "our team")
    # A template fix, released as v0.2.0: a new module and a changed line, both naming the service.
    init = template / "service/__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.2.0"'))
    (template / "service/release.py").write_text(
        f'"""Which release of {OLD} this is."""\n\nRELEASE = "{OLD} 0.2.0"\n'
    )
    git(template, "add", "-A")
    git(template, "commit", "-q", "-m", "template 0.2.0")
    git(template, "tag", "v0.2.0")

    done = fork_tool("update", str(fork))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{FORK_NAME} is run by the pasture team" in readme.read_text()  # kept
    assert '__version__ = "0.2.0"' in (fork / "service/__init__.py").read_text()  # taken
    assert (fork / "service/release.py").read_text().endswith(f'RELEASE = "{FORK_NAME} 0.2.0"\n')
    assert "_commit: v0.2.0" in (fork / ".copier-answers.yml").read_text()
    assert mentions_of_old_name(fork) == []
    assert fork_tool("check", str(fork)).returncode == 0  # no markers, no .rej, no unmerged
    git(fork, "add", "-A")
    git(fork, "commit", "-q", "-m", "update to 0.2.0")
    # Still green: lint (ruff, import layers, and mypy on what the update changed:
    # the fork's fast suite above ran mypy on all of it) and the suites it touched.
    for argv in (
        [".venv/bin/ruff", "check", "."],
        [".venv/bin/ruff", "format", "--check", "."],
        [".venv/bin/mypy", "service/__init__.py", "service/release.py"],
        [".venv/bin/lint-imports"],
    ):
        done = run_in(fork, *argv)
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    done = run_in(fork, ".venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests/config")  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:]


@pytest.mark.timeout(900)
def test_control_a_conflicting_update_exits_0_from_copier_but_fails_the_wrapper(
    drill: Drill,
) -> None:
    template, fork = drill.template, drill.fork
    init = fork / "service/__init__.py"
    version = re.search(r'__version__ = "([^"]+)"', init.read_text())
    assert version
    init.write_text(
        init.read_text().replace(
            version.group(0), f'__version__ = "{version.group(1)}+{FORK_NAME}"'
        )
    )
    git(fork, "commit", "-q", "-am", "our version")
    template_init = template / "service/__init__.py"
    template_init.write_text(
        re.sub(r'__version__ = "[^"]+"', '__version__ = "0.3.0"', template_init.read_text())
    )
    git(template, "commit", "-q", "-am", "template 0.3.0")
    git(template, "tag", "v0.3.0")

    copier = shutil.which("copier") or str(Path(sys.executable).parent / "copier")
    done = subprocess.run(
        [copier, "update", "--trust", "--defaults", "--conflict", "inline", str(fork)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr  # copier: all well ...
    assert "<<<<<<< " in init.read_text()  # ... with a conflict in the file
    checked = fork_tool("check", str(fork))
    assert checked.returncode == 1
    assert "service/__init__.py" in checked.stderr and "conflict marker" in checked.stderr
