"""Give back the resident pages of a tensor that lies in a memory-mapped checkpoint file.

Weights loaded in place from a `.safetensors` file are pages of the file's mapping: once read they
count in the process's memory for as long as the mapping lives, i.e. while any tensor of that file is
in use. A weight that is replaced by a converted copy (e.g. `PackedLinear`'s) would then be counted
twice (docs/speed.md). `madvise(MADV_DONTNEED)` drops the pages from
this process; the data stays in the file (and the page cache), so a later read of the range, if any,
faults the same bytes back in. Only ranges inside a file mapping are touched: on anonymous memory the
call would zero the data. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def safetensors_mappings() -> list[tuple[int, int]]:
    """(start, end) address ranges of this process's mappings of `.safetensors` files."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip().endswith(".safetensors"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def release_mapped_pages(t: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Drop the whole pages of `t`'s bytes that lie in one of `mappings`; returns the bytes released."""
    if t.device.type != "cpu" or not t.is_contiguous() or not mappings:
        return 0
    page = mmap.PAGESIZE
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    start, end = -(-first // page) * page, last // page * page  # whole pages only: neighbours keep theirs
    if end <= start or not any(lo <= start and end <= hi for lo, hi in mappings):
        return 0
    if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        return 0
    return end - start
