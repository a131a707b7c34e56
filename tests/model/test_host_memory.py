"""glibc's mmap threshold is fixed once per process unless the user said otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorasft.model.host_memory import THP_SWITCH, huge_pages_allowed, release_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def test_set_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("LORASFT_MALLOC_THRESHOLD", raising=False)
    monkeypatch.setenv(THP_SWITCH, "0")  # restored (unset) after the test
    monkeypatch.delenv(THP_SWITCH)
    assert release_freed_memory() is True  # mallopt accepted it (returns 1)
    assert os.environ.get(THP_SWITCH) == ("1" if huge_pages_allowed() else None)
    monkeypatch.setenv("LORASFT_MALLOC_THRESHOLD", "0")
    assert release_freed_memory() is False
    monkeypatch.delenv("LORASFT_MALLOC_THRESHOLD")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # glibc read it at start-up
    assert release_freed_memory() is False


def clean_env() -> dict[str, str]:
    """The allocator as a fresh shell gives it: no variable glibc's malloc or PyTorch's reads.
    (In the full suite the 'moving' case once kept 300 MiB or less; glibc reads MALLOC_*_ and
    GLIBC_TUNABLES at start-up, and MALLOC_TOP_PAD_=0 alone turns its 407 MiB into 7.)"""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "GLIBC_", "LD_PRELOAD", "LORASFT_MALLOC", "THP_"))}  # fmt: skip


FRAGMENT = """
import sys, torch
from lorasft.model.host_memory import release_freed_memory
if sys.argv[1] == "fixed":
    assert release_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
big = torch.ones(7 << 20)  # 28 MiB, mapped; freeing it moves glibc's threshold past 20 MiB
del big
blocks, kept = [], []
for _ in range(20):  # 20 x 20 MiB, each followed by a small block that stays (as activations do)
    blocks.append(torch.ones(5 << 20))
    kept.append(torch.ones(1024))
del blocks
print((rss() - base) >> 20)
"""


def kept_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True,
                         env={**clean_env(), "OMP_NUM_THREADS": "2"}, check=True)  # fmt: skip
    return int(out.stdout.strip())


def test_freed_blocks_go_back_to_the_system():
    """400 MiB of 20 MiB tensors, freed: with the threshold fixed they are unmapped, every time;
    with glibc's moving threshold they can stay in the heap. That control varies from run to run
    on this machine: standalone it kept 401-406 MiB in 12 of 12 runs, but inside full-suite runs,
    beside the other worker, it fell below 300 MiB now and then (46 MiB the lowest seen; one
    fresh-clone `make test` of 2026-12-06 among them). So it must keep them in one of three runs:
    glibc's case shown able to hold the memory, lorasft's fixed threshold never."""
    assert kept_mib("fixed") < 50
    controls = []
    for _ in range(3):
        controls.append(kept_mib("moving"))
        if controls[-1] > 300:
            break
    assert max(controls) > 300, controls
    assert kept_mib("fixed") < 50


HUGE = """
import torch
from lorasft.model.host_memory import release_freed_memory
release_freed_memory()
x = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, touched
addr, eligible, inside = x.data_ptr(), None, False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= addr < hi
    elif inside and head == "THPeligible:":
        eligible = int(line.split()[1])
print(eligible)
"""


@pytest.mark.skipif(not huge_pages_allowed(), reason="the kernel gives no transparent huge pages")
@pytest.mark.parametrize("threshold", [None, "0"])
def test_large_blocks_are_advised_huge_pages_with_the_threshold(threshold):
    """With lorasft's allocator settings a 16 MiB tensor's mapping is eligible for 2 MiB pages
    (PyTorch advised it); with LORASFT_MALLOC_THRESHOLD=0 (glibc and PyTorch as they are) only
    where the kernel gives them to every mapping (`always`). Whether the kernel then finds free
    2 MiB pages is its business, so the advice is what is checked."""
    env = clean_env()
    if threshold is not None:
        env["LORASFT_MALLOC_THRESHOLD"] = threshold
    out = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    always = "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    assert int(out.stdout.strip()) == (1 if threshold is None or always else 0)
