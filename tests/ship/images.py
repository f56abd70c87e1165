"""Build the Dockerfile with no Docker engine and run the image as a container would.

buildah (vfs storage, chroot isolation) builds the Dockerfile over a Debian
base made here by debootstrap, since no image registry is reachable; the base
and a scratch image holding this machine's uv are cached in a storage of our
own (under STATE_DIR, keyed by their inputs) and rebuilt when missing. A run
mounts the image's root filesystem and starts its entrypoint + command as
PID 1 of a fresh PID and mount namespace, on the host's network, as the
image's user, with the image's environment: what `docker run --network host`
does, minus the cgroup and network isolation this machine cannot give.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("SHIP_STATE_DIR", "/var/tmp/cattle-ship"))

# The local base: Debian 12 with its python3 (same path in both stages).
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_RECIPE_VERSION = "1"  # bump when the recipe below changes
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def tools_missing() -> list[str]:
    return [t for t in ("buildah", "debootstrap", "unshare", "chroot") if not shutil.which(t)]


def uv_binary() -> Path:
    found = shutil.which("uv") or str(Path.home() / ".local/bin/uv")
    return Path(found)


def _storage_args() -> list[str]:
    return [
        "--root",
        str(STATE_DIR / "storage"),
        "--runroot",
        str(STATE_DIR / "runroot"),
        "--storage-driver",
        "vfs",
    ]


def buildah(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["buildah", *_storage_args(), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip()


def image_exists(ref: str) -> bool:
    return bool(buildah("images", "-q", ref, check=False))


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """One test session at a time builds the cached images."""
    import fcntl

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def base_key() -> str:
    recipe = json.dumps(
        [BASE_RECIPE_VERSION, BASE_SUITE, BASE_MIRROR, BASE_PACKAGES, "minbase"]
    ).encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def base_image() -> str:
    """The Debian base (debootstrap), built once per recipe and kept in our storage."""
    ref = f"localhost/cattle-ship-base:{base_key()}"
    with _state_lock():
        if image_exists(ref):
            return ref
        work = Path(tempfile.mkdtemp(prefix="base-", dir=STATE_DIR))
        container = None
        try:
            rootfs = work / "rootfs"
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    BASE_SUITE,
                    str(rootfs),
                    BASE_MIRROR,
                ],
                capture_output=True,
                check=True,
                timeout=900,
            )
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(rootfs / cache, ignore_errors=True)
            container = buildah("from", "scratch")
            mount = buildah("mount", container)
            subprocess.run(["cp", "-a", f"{rootfs}/.", f"{mount}/"], check=True, timeout=300)
            buildah("umount", container)
            buildah(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                '["python3"]',
                container,
            )
            buildah("commit", "--quiet", container, ref, timeout_s=300)
        finally:
            if container:
                buildah("rm", container, check=False)
            shutil.rmtree(work, ignore_errors=True)
    return ref


def uv_version() -> str:
    out = subprocess.run(
        [str(uv_binary()), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return out.split()[1]


def uv_image() -> str:
    """An image holding /uv, as the official uv image does, from this machine's uv."""
    ref = f"localhost/cattle-ship-uv:{uv_version()}"
    with _state_lock():
        if image_exists(ref):
            return ref
        container = buildah("from", "scratch")
        try:
            buildah("copy", container, str(uv_binary()), "/uv")
            buildah("commit", "--quiet", container, ref)
        finally:
            buildah("rm", container, check=False)
    return ref


@dataclass(frozen=True)
class Built:
    image_id: str
    ref: str
    build_s: float
    log: str


def build(context: Path = REPO, *, base: str, uv: str) -> Built:
    """`docker build` of the Dockerfile in `context`, with the local base and uv image."""
    ref = f"localhost/cattle-ship-app:{uuid.uuid4().hex[:12]}"
    args = [
        "bud",
        "--isolation",
        "chroot",
        "--pull=never",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"UV_IMAGE={uv}",
        "--tag",
        ref,
    ]
    if CA_BUNDLE.exists():  # this machine's TLS-intercepting proxy, for PyPI
        args += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    before = set(buildah("containers", "--quiet", "--all").split())
    started = time.monotonic()
    try:
        log = buildah(*args, str(context), timeout_s=900)
    finally:
        # buildah 1.28 leaves the working container of a stage used only by
        # COPY --from (the uv stage) behind: remove what this build made.
        for leftover in set(buildah("containers", "--quiet", "--all").split()) - before:
            buildah("rm", leftover, check=False)
    took = time.monotonic() - started
    return Built(buildah("images", "-q", "--no-trunc", ref).removeprefix("sha256:"), ref, took, log)


def remove_image(image_id: str) -> None:
    buildah("rmi", "--force", image_id, check=False)


def inspect(ref: str) -> dict[str, object]:
    config: dict[str, object] = json.loads(buildah("inspect", "--type", "image", ref))
    return config


def image_config(ref: str) -> dict[str, object]:
    oci = inspect(ref)["OCIv1"]
    assert isinstance(oci, dict)
    config = oci["config"]
    assert isinstance(config, dict)
    return config


def image_size_bytes(ref: str) -> int:
    """The uncompressed size of the image's layers, as `buildah images` reports it."""
    out = buildah("images", "--format", "{{.Size}}", "--noheading", ref)
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    number, unit = out.split()[0:2] if " " in out else (out[:-2], out[-2:])
    return int(float(number) * units[unit])


class Mounted:
    """A working container of an image, its root filesystem mounted on the host."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.container = buildah("from", "--pull=never", ref)
        try:
            self.root = Path(buildah("mount", self.container))
        except Exception:
            buildah("rm", self.container, check=False)
            raise

    def close(self) -> None:
        buildah("umount", self.container, check=False)
        buildah("rm", self.container, check=False)

    def __enter__(self) -> Mounted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Run:
    """The image's process as PID 1 of its own PID namespace, on the host's network.

    `argv` replaces entrypoint + command (None: the image's own). `pid` is
    that process's PID on the host, so a signal reaches it as the
    orchestrator's would.
    """

    def __init__(
        self,
        mounted: Mounted,
        config: dict[str, object],
        *,
        env: dict[str, str],
        argv: Sequence[str] | None = None,
        log: Path,
    ) -> None:
        entrypoint = list(config.get("Entrypoint") or [])  # type: ignore[call-overload]
        command = list(config.get("Cmd") or [])  # type: ignore[call-overload]
        self.argv = list(argv) if argv is not None else entrypoint + command
        user = str(config.get("User") or "0:0")
        uid, _, gid = user.partition(":")
        environment = dict(
            item.split("=", 1)
            for item in config.get("Env") or []  # type: ignore[attr-defined]
        )
        environment.setdefault("HOME", str(config.get("WorkingDir") or "/"))
        environment.update(env)
        root = shlex.quote(str(mounted.root))
        workdir = shlex.quote(str(config.get("WorkingDir") or "/"))
        env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in environment.items())
        command_line = " ".join(shlex.quote(a) for a in self.argv)
        # Mounts stay inside the new mount namespace; the last exec makes the
        # image's process the namespace's PID 1 (same PID as the forked child).
        script = (
            f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
            f"exec chroot --userspec={uid}:{gid or uid} {root} "
            f"/usr/bin/env -i -C {workdir} {env_args} {command_line}"
        )
        self.log_path = log
        self._log = log.open("wb")
        self.outer = subprocess.Popen(
            ["unshare", "--pid", "--mount", "--fork", "--kill-child", "sh", "-c", script],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self._child_pid()

    def _child_pid(self) -> int:
        children = Path(f"/proc/{self.outer.pid}/task/{self.outer.pid}/children")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                text = children.read_text().split()
                if text:
                    return int(text[0])
            if self.outer.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"the container process did not start: {self.output()}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.outer.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the namespace's init (which takes every process in it along)."""
        if self.outer.poll() is None:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.outer.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.outer.wait(timeout=10)
        self._log.close()

    def process_uids(self) -> tuple[int, int]:
        """(real, effective) uid of the container process as the kernel sees it."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                real, effective = line.split()[1:3]
                return int(real), int(effective)
        raise RuntimeError("no Uid line")

    def ns_pid(self) -> int:
        """The process's PID inside its own namespace (1 for a container's init)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise RuntimeError("no NSpid line")


TIMINGS = STATE_DIR / "timings.json"  # how long each step took the last time here


def run_steps(
    steps: Sequence[tuple[str, str, Callable[[], object]]],
    *,
    timings: Path = TIMINGS,
    echo: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
) -> list[object]:
    """Run (key, what, step) in order, each announced with its number, what it
    does and how long it took the last time on this machine, then how long it
    took now; the times are kept for the next build's estimate."""
    try:
        last: dict[str, float] = json.loads(timings.read_text())
    except (OSError, ValueError):
        last = {}
    results, began = [], clock()
    for number, (key, what, step) in enumerate(steps, 1):
        estimate = f", about {last[key]:.0f} s as the last time here" if key in last else ""
        echo(f"image: step {number} of {len(steps)}, {what}{estimate} ...")
        started = clock()
        results.append(step())
        last[key] = clock() - started
        echo(f"image: step {number} of {len(steps)} done in {last[key]:.0f} s")
    echo(f"image: built in {clock() - began:.0f} s")
    with contextlib.suppress(OSError):
        timings.write_text(json.dumps(last))
    return results


def main() -> None:
    """`python -m tests.ship.images`: build the image here and print its reference."""
    missing = tools_missing()
    if missing:
        raise SystemExit(f"missing: {' '.join(missing)} (make sysdeps installs them)")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    base, uv, built = run_steps(
        [
            ("base", "the Debian base (debootstrap; kept after the first build)", base_image),
            ("uv", "the uv image (from this machine's uv)", uv_image),
            ("build", "the Dockerfile (buildah)", lambda: build(base=base_image(), uv=uv_image())),
        ]
    )
    assert isinstance(built, Built), (base, uv)
    print(
        f"{built.ref} ({image_size_bytes(built.ref) / 1e6:.0f} MB, built in {built.build_s:.0f} s)"
    )
    print(f"storage: buildah {' '.join(_storage_args())}")


if __name__ == "__main__":
    main()
