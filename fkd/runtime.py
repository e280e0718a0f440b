"""Process-wide settings the CLI applies once at start-up (a library import changes nothing).

CPU memory allocator. fkd's step is pure: every step returns *new* parameter and optimizer-state
tensors instead of updating the old ones in place. With glibc's default malloc, blocks above a dynamic
threshold (128 KiB to 32 MiB) are mmap-ed and handed back to the kernel on free, so each step pays page
faults for fresh pages -- measured here as ~10% of a logit-KD step on 2 CPU cores (``fkd bench``,
functional vs imperative 1.11-1.23x before, 1.04-1.06x after). Raising the mmap and trim thresholds keeps
freed blocks in the heap for the next step to reuse, the same remedy PyTorch's CPU performance guide
gives (jemalloc / tcmalloc). Skipped when the user preloads another allocator or sets glibc's
``MALLOC_*`` variables, and on anything but Linux with glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
_TRIM_THRESHOLD = 1 << 30


def tune_cpu_allocator() -> bool:
    """Keep freed blocks in glibc's heap for reuse; True when the setting was applied."""
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        return False
    if any(key.startswith("MALLOC_") for key in os.environ):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
