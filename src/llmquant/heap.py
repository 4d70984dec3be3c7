"""Keep freed memory in the process's heap during inference on the CPU (glibc's allocator), so that the large
tensors of a prefill do not come from fresh pages at every call.

glibc gives a freed block of at least ``M_MMAP_THRESHOLD`` bytes back to the system, and trims the heap's top
beyond ``M_TRIM_THRESHOLD``; the next tensor of that size is then a fresh memory map whose every page faults in when
it is first written. A prefill at batch 8 of the default model allocates and frees tensors of up to 25 MB at every
Linear (the int32 products, the SiLU and the products of the MLP); on an AMD EPYC whose one core copies 27 GB/s
(read and write, `scripts/runtime_profile.py machine`), `llmquant bench` of the W8A8 per-token checkpoint prefilled
7-11% faster at batch 8 on one thread with the thresholds raised (BENCHMARKS.md, "A second AVX512-VNNI EPYC").
`retain_freed_memory` raises both for this process: freed blocks stay in the heap for the next tensor. Memory then is
not returned to the system until the process ends, so the command line sets it for the commands that run a model
(``bench``, ``eval``), not for ``quantize``, whose peak memory it reports and caps.

Not set: off glibc (another allocator has its own policy), where the user has set either threshold through
glibc's environment variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), or with ``LLMQUANT_HEAP=0``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (256 * 2**20, 32 * 2**20)  # freed blocks below this stay in the heap: the first one glibc takes
# (its manual gives 32 MiB as the largest on 64-bit systems; newer versions take more)
TRIM_THRESHOLD = 2**30  # the heap's top is trimmed beyond 1 GiB free
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def heap_refusal() -> str | None:
    """Why `retain_freed_memory` leaves the allocator as it is, or None."""
    if os.environ.get("LLMQUANT_HEAP", "1") == "0":
        return "off (LLMQUANT_HEAP=0)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc's allocator"
    if set_by_user := [name for name in USER_SETTINGS if name in os.environ]:
        return f"set by the environment ({', '.join(set_by_user)})"
    return None


def retain_freed_memory() -> dict[str, int]:
    """Raise glibc's memory-map and trim thresholds for this process (module docstring); the values set, or {} where
    `heap_refusal` says why not (logged)."""
    if (why := heap_refusal()) is not None:
        log.info("heap thresholds left as they are: %s", why)
        return {}
    libc = ctypes.CDLL(None)
    mmap = next((value for value in MMAP_THRESHOLDS if libc.mallopt(M_MMAP_THRESHOLD, value) == 1), None)
    if mmap is None or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.info("heap thresholds left as they are: glibc's mallopt refused them")
        return {}
    log.info("heap thresholds: freed blocks under %d MiB stay in the process", mmap >> 20)
    return {"M_MMAP_THRESHOLD": mmap, "M_TRIM_THRESHOLD": TRIM_THRESHOLD}


__all__ = ["heap_refusal", "retain_freed_memory"]
