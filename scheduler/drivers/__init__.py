"""Task drivers: implementations of `scheduler.driver.Driver`.

- `process.ProcessDriver`: host processes in their own session, cgroup v2 limits where writable.
- `docker.DockerDriver`: containers (imported from `scheduler.drivers.docker` directly, so that
  the process driver never depends on a Docker client being installed).
"""

from __future__ import annotations

from scheduler.drivers.process import ProcessDriver

__all__ = ["ProcessDriver"]
