"""glibc malloc thresholds for the HTTP data plane.

Each read from a socket becomes a bytes object of up to 256 KiB (uvloop's read buffer), so a
large response passes through many such buffers a second. glibc serves these sizes with mmap
at first; once one is freed it raises its mmap threshold and serves them from the heap, and it
gives the top of the heap back to the kernel whenever more than twice that threshold is free
there. Whether that happens on every large response depends only on what else happens to be
allocated at the heap's top: measured through the proxy, 0 or ~40 minor page faults per 1 MiB
response from one run to the next, and with them twice the kernel time per response.

Fixed thresholds take the luck out: buffers up to MMAP_THRESHOLD come from the heap, and up to
TRIM_THRESHOLD of free heap stays mapped for the next ones (bigger objects still get their own
mapping, returned when freed).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

MMAP_THRESHOLD: Final = 1024 * 1024
TRIM_THRESHOLD: Final = 16 * 1024 * 1024

_tuned = False


def tune_malloc() -> bool:
    """Set the thresholds once per process. True when they are set (glibc on Linux); elsewhere
    nothing changes."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either disables glibc's own adjustment of both; mallopt returns 1 on success.
    _tuned = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _tuned
