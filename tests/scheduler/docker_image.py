"""The docker driver tests' image, built locally (there is no registry here).

`pointsman-test:busybox` is a rootfs holding only Debian's static busybox (package
busybox-static) with its applet links, imported with `docker import`. Python comes from the
host: tests mount the host's /usr read-only at /usr, so `python3` runs inside the container
with the host's interpreter and libraries (the rootfs links /lib, /lib64 and /bin into /usr
the way Debian's merged-/usr layout does, which is what the host binaries' loader path needs).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

IMAGE = "pointsman-test:busybox"
# Every container a test run creates carries `pointsman.test=<RUN_ID>`, for its cleanup.
RUN_ID = uuid.uuid4().hex[:8]
TEST_LABEL = "pointsman.test"
USR = {"/usr": "/usr:ro"}  # the host's Python, read-only

# Applets the tests use (and a few for poking around with `docker exec`).
_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "env", "ps", "kill", "wget", "true", "false", "id")


def _busybox() -> Path | None:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            return path
    found = shutil.which("busybox")
    return Path(found) if found else None


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info)


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = int(time.time())
    tar.addfile(info)


def rootfs_tarball(busybox: Path) -> bytes:
    """A minimal rootfs: /busybox plus applet links in /sbin, merged-/usr links, /tmp, /etc."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("sbin", "usr", "tmp", "etc", "proc", "sys", "dev", "root", "srv"):
            _add_dir(tar, directory, 0o1777 if directory == "tmp" else 0o755)
        tar.add(str(busybox), arcname="sbin/busybox")
        for applet in _APPLETS:
            _add_symlink(tar, f"sbin/{applet}", "busybox")
        # Debian's merged /usr: host binaries under the mounted /usr find their loader via /lib64.
        for link in ("bin", "lib", "lib64"):
            _add_symlink(tar, link, f"usr/{link}")
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/sbin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ensure_image() -> str:
    """Import the image unless it is already there; returns its name. Raises RuntimeError with a
    reason when it cannot be built (no busybox, import failed)."""
    present = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=30)
    if present.returncode == 0:
        return IMAGE
    busybox = _busybox()
    if busybox is None:
        raise RuntimeError("no static busybox (install Debian's busybox-static) to build the test image")
    result = subprocess.run(
        ["docker", "import", "--change", 'ENV PATH="/sbin:/usr/bin:/bin"', "-", IMAGE],
        input=rootfs_tarball(busybox),
        capture_output=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"docker import failed: {result.stderr.decode(errors='replace').strip()}")
    return IMAGE
