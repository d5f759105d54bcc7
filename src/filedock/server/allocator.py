"""The C allocator's settings for ``filedock serve`` (glibc only).

Every read of an upload is a new 1 MiB ``bytes`` (Twisted's ``recv``), held in the writer's queue
(up to 32 MiB an upload) until it is hashed and copied into the direct-I/O buffer, then freed on a
queue thread. glibc's defaults adapt badly to that: after the first such block is freed it serves
them from the heap but trims the heap's top whenever 2 MiB are free, so the heap shrinks and grows
all the time and each regrowth faults its pages in afresh (20-60 thousand minor faults per GiB
uploaded, measured). Three settings stop that:

- ``M_MMAP_THRESHOLD`` 4 MiB, fixed: a read buffer is always a heap block (larger blocks are still
  mapped and unmapped on their own);
- ``M_TRIM_THRESHOLD`` 64 MiB: up to 64 MiB of freed heap stays mapped for the next reads;
- ``M_TOP_PAD`` 16 MiB: the heap grows in 16 MiB steps, not one ``brk`` per read.

Measured (1 GiB ``filedock upload``, interleaved pairs against the defaults): minor faults 20-60
thousand -> 3-5 thousand per GiB; server CPU 0.930 -> 0.875 s and the whole upload 1.051x by
pairs (16 pairs; -7 and -10 % CPU in two earlier A/Bs of nearby settings). The cost is memory that
stays resident after a burst: at most 64 MiB of free heap, plus the 16 MiB pad (the 4 GiB memory
case: +52.6 MiB peak growth, +57.3 before).

An operator's own ``MALLOC_*_`` environment variables (glibc's tunables, read at start) win: if
any of these three is set there, nothing is changed. Another C library: nothing is changed.
"""

from __future__ import annotations

import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MiB = 1 << 20
SETTINGS = ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 4 * MiB),
            (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 64 * MiB),
            (M_TOP_PAD, "MALLOC_TOP_PAD_", 16 * MiB))
ENV_TUNABLES = "GLIBC_TUNABLES"


def tune(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Apply ``SETTINGS`` with ``mallopt``; returns what was set (empty: nothing was)."""
    environ = os.environ if environ is None else environ
    if any(name in environ for _, name, _ in SETTINGS) or "glibc.malloc." in environ.get(ENV_TUNABLES, ""):
        return {}
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return {}
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS)
        return {}
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = {}
    for param, name, value in SETTINGS:
        if mallopt(param, value) == 1:  # mallopt returns 1 on success
            done[name.strip("_").lower()] = value
    return done
