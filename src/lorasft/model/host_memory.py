"""Give freed tensor memory back to the operating system on CPU.

glibc's malloc serves a request above its mmap threshold with a fresh mapping that is unmapped
on free, and anything smaller from its heaps, which keep freed space for reuse. The threshold
starts at 128 KiB but rises to the size of every mapped block freed, up to 32 MiB, so after the
first long forward pass every activation under 32 MiB comes from the heaps; with two threads'
arenas and tensors of changing sizes the heaps fragment, and resident memory climbs to several
times what is alive. Measured with one training step of the default model at 8,192 tokens on a
2-core AVX2 CPU (bench/long_context/long_step.py, fp32): 9.2-10.2 GiB peak resident with glibc's moving
threshold; fixed at 4 MiB 2.3 GiB, about 5% slower (the kernel faults in and zeroes a fresh
mapping for every block over 4 MiB, 4 KiB at a time), which huge pages (`THP_SWITCH`) more than
win back; at 16 MiB 3.0 GiB (docs/long-context.md: "The loss at long lengths"). Fixing it is glibc's documented
`mallopt(M_MMAP_THRESHOLD, ...)`; the environment variable `MALLOC_MMAP_THRESHOLD_` that glibc
reads at start-up does the same before Python runs, and one set there is left alone, as is a
process whose allocator is not glibc's (the call is then a no-op that reports False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 4 << 20
"""Blocks of 4 MiB and more are mapped, and unmapped when freed. 16 MiB was as fast as glibc's
own but left `lorasft train` at 8,192 tokens, its evaluation included, at 3.73 GiB (4 MiB:
2.81); 4 MiB alone costs about 5% of a long step, huge pages win it back
(LORASFT_MALLOC_THRESHOLD=16777216 for the other trade)."""
TRIM_THRESHOLD = 128 << 20
"""Free space at the top of the heap kept up to 128 MiB (a fixed mmap threshold also stops
glibc moving this one, and its 128 KiB default gives memory back and asks for it again all the
time)."""


THP_SWITCH = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's own switch (c10's CPU allocator): blocks of 2 MiB and more aligned to 2 MiB and
advised MADV_HUGEPAGE. Each mapped block's pages are then faulted in 2 MiB at a time instead of
4 KiB: one step at 8,192 tokens took 109.0 s against 120.7 s with the threshold alone, peak
resident the same (2.28 / 2.27 GiB; bench/long_context/long_step.py, 2-core AVX2 CPU, 2026-12-06)."""


def huge_pages_allowed() -> bool:
    """Whether the kernel gives transparent huge pages to a region that asks (`always` or
    `madvise`, not `never`)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (Linux), and ask PyTorch
    for huge pages on large blocks (`THP_SWITCH`, unless set or the kernel refuses them). False
    where the threshold was not set: another OS or allocator, `MALLOC_MMAP_THRESHOLD_` already
    set, or `LORASFT_MALLOC_THRESHOLD=0` (then huge pages are left as they are too). Call it
    before the first large tensor: PyTorch reads its switch once."""
    wanted = os.environ.get("LORASFT_MALLOC_THRESHOLD")
    if wanted:
        threshold = int(wanted)
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
    if fixed and huge_pages_allowed():
        os.environ.setdefault(THP_SWITCH, "1")
    return fixed
