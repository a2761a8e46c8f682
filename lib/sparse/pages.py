"""Packed weights on transparent huge pages (Linux).

A batch-1 decode streams every packed weight once per token, in eight streams per thread (four rows' values and
masks). On 4 KiB pages each stream crosses a page every 4 KiB: a TLB miss, and the hardware prefetchers stop at the
boundary. On 2 MiB pages the 7B block's fp32 decode at 70% ran at 29.3 GB/s instead of 26.5 (the machine's streaming
reads: 29.5), 10.0 -> 9.2 ms (Xeon, 2 threads). torch's allocator gives huge pages only when the process sets
THP_MEM_ALLOC_ENABLE=1 before its first allocation, so SparseLinear places its own buffers.

How: a private anonymous mapping (shared ones are shmem, which THP usually leaves alone) a huge page longer than
the data, the data starting at its first 2 MiB boundary, and MADV_HUGEPAGE on the whole huge pages the data covers
(before anything touches them: pages already faulted in stay small). The tail past the last whole huge page stays
on small pages, and the slack before the boundary is never touched, so the resident size equals the data's.
Elsewhere (another OS, THP off, small tensors, a non-CPU tensor, ATP_SPARSE_HUGE_PAGES=0) tensors stay as they are.
"""
from __future__ import annotations

import mmap
import os

import torch

HUGE_PAGE = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """'always', 'madvise' or 'never' (the bracketed word of the kernel's setting); 'never' when unreadable."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "never"


def available() -> bool:
    """Whether on_huge_pages can place tensors on huge pages here (Linux, THP not 'never', not switched off)."""
    if os.environ.get("ATP_SPARSE_HUGE_PAGES", "").strip().lower() in ("0", "off", "no", "false"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and thp_mode() in ("always", "madvise")


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous CPU tensor of at least one huge page, its data on huge pages from its first byte;
    the tensor itself when that cannot be done here (see the module's docstring)."""
    nbytes = tensor.numel() * tensor.element_size()
    if (nbytes < HUGE_PAGE or tensor.device.type != "cpu" or not tensor.is_contiguous()
            or tensor.requires_grad or not available()):
        return tensor
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    try:
        area.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel that refuses the advice: the data still works on small pages
        pass
    # frombuffer keeps `area` alive for as long as the tensor's storage lives; the mapping goes with it.
    placed = torch.frombuffer(area, dtype=tensor.dtype, count=tensor.numel(), offset=start).view(tensor.shape)
    placed.copy_(tensor)
    return placed


def mapping_bytes(tensor: torch.Tensor) -> dict[str, int] | None:
    """The memory map entry holding the tensor's first byte, from /proc/self/smaps: its bytes resident ("Rss") and
    on huge pages ("AnonHugePages"); None where that cannot be read (not Linux)."""
    address, fields, inside = tensor.data_ptr(), {}, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line: low-high perms ...
                    if inside:
                        break
                    low, high = (int(end, 16) for end in parts[0].split("-"))
                    inside = low <= address < high
                elif inside and parts[0] in ("Rss:", "AnonHugePages:"):
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
    except (OSError, ValueError):
        return None
    return fields if inside else None
