"""``keep_freed_memory``: glibc keeps a freed large block mapped for the next step instead of unmapping it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A fresh process per setting: the allocator's mode, once set, stays for the process.
FREE_A_LARGE_BLOCK = """
import sys, psutil, torch
from recbole_speeder.allocator import keep_freed_memory
took = keep_freed_memory(sys.argv[1] == "True")
process = psutil.Process()
before = process.memory_info().rss
block = torch.ones(64 * 2**18)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
del block
print(took, (process.memory_info().rss - before) / 2**20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_large_block_stays_mapped_only_when_kept():
    kept = {}
    for setting in (True, False):
        out = subprocess.run([sys.executable, "-c", FREE_A_LARGE_BLOCK, str(setting)], capture_output=True, text=True,
                             check=True).stdout.split()
        kept[setting] = (out[0] == "True", float(out[1]))
    assert kept[True][0] and kept[True][1] > 60  # the 64 MiB stay resident, ready for the next step
    assert not kept[False][0] and kept[False][1] < 8  # glibc's default: mmap'd, then unmapped at free

