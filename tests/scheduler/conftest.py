"""Fixtures shared by the scheduler's tests: a reachable Docker engine and the test image."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .docker_image import RUN_ID, TEST_LABEL, ensure_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def docker_image() -> str:
    """Make the engine reachable (or skip with the reason) and build the test image once."""
    script = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ensure-docker.sh")], capture_output=True, text=True, timeout=300
    )
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30) if _has_docker() else None
    if info is None or info.returncode != 0:
        said = [line for line in script.stderr.splitlines() if line.startswith("ensure-docker:")]
        reason = " / ".join(said) or (info.stderr.strip() if info else "no docker client")
        pytest.skip(f"no Docker engine: {reason}")
    try:
        return ensure_image()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot build the test image: {exc}")


def _has_docker() -> bool:
    try:
        subprocess.run(["docker", "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture
def cleanup_containers() -> Iterator[Any]:
    """A docker SDK client; on teardown removes every container labelled with this run's id."""
    import docker

    client = docker.from_env()
    try:
        yield client
    finally:
        for container in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
        client.close()
