"""``filedock serve``'s allocator settings: read buffers reuse heap pages instead of faulting them in anew.

Each case runs in a fresh interpreter (glibc's settings are process-wide and cannot be undone).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from filedock.server import allocator

# 50 rounds of what an upload's queue does: 32 reads of 1 MiB held, then all freed
CHURN = """
import resource, sys
from filedock.server import allocator
tuned = allocator.tune() if sys.argv[1] == "tune" else {}
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    blocks = [b"\\x01" * (1 << 20) for _ in range(32)]
    del blocks
print(len(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(not (hasattr(os, "confstr") and os.confstr("CS_GNU_LIBC_VERSION")),
                           reason="the settings are glibc's; another C library is left as it is")


def _churn(mode: str, **env: str) -> tuple[int, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True,
                         env={**environ, **env}).stdout.split()
    return int(out[0]), int(out[1])


@glibc
def test_tuned_heap_keeps_freed_read_buffers_instead_of_faulting_them_in_again():
    settings, tuned = _churn("tune")
    _, default = _churn("default")
    assert settings == 3
    # default: the heap top is trimmed whenever 2 MiB of it are free, so rounds fault their pages in
    # again (74 thousand faults here; 400 thousand when the blocks are freed one by one); tuned:
    # only the first round's 8192 pages
    assert tuned * 4 < default, (tuned, default)
    assert tuned < 2 * 32 * 256, tuned  # about one round's 32 MiB of pages, not one per round


@glibc
@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"])
def test_an_operators_own_malloc_setting_wins(name):
    settings, _ = _churn("tune", **{name: str(128 << 10)})
    assert settings == 0
    assert allocator.tune({name: "1"}) == {}


def test_glibc_tunables_for_malloc_also_win():
    assert allocator.tune({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) == {}


@glibc
def test_serve_logs_what_it_set(tmp_path):
    from tests.integration.harness import ServerProcess

    server = ServerProcess(tmp_path / "data").start()
    try:
        assert "allocator: malloc_mmap_threshold=4194304 malloc_trim_threshold=67108864 " \
               "malloc_top_pad=16777216" in server.log()
    finally:
        server.stop()
