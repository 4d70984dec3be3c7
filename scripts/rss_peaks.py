"""Run a Python script and say where its resident memory peaks: at each new peak (20 MiB above the last), the time,
the resident size, glibc's heap (``mallinfo2``: in use, free, memory-mapped) and the main thread's innermost
frames. Linux and glibc only.

    PYTHONPATH=src .venv/bin/python scripts/rss_peaks.py scripts/moe_layer_bench.py --max-memory 3.5GB
"""

from __future__ import annotations

import ctypes
import runpy
import sys
import threading
import time
import traceback

from llmquant.device import resident_bytes

STEP_MIB = 20  # a new peak is recorded when the resident size passes the last one by this much
FRAMES = 8  # innermost frames of the main thread recorded at a peak
SHOWN = 12  # last peaks printed


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    main_thread, start, peaks = threading.get_ident(), time.perf_counter(), []

    def sample() -> None:
        best = 0
        while True:
            resident = resident_bytes() // 2**20
            if resident > best + STEP_MIB:
                best = resident
                info = libc.mallinfo2()
                frame = sys._current_frames().get(main_thread)
                stack = traceback.extract_stack(frame)[-FRAMES:] if frame is not None else []
                where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in stack]
                peaks.append((time.perf_counter() - start, resident, info.uordblks >> 20, info.fordblks >> 20,
                              info.hblkhd >> 20, where))
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        for seconds, resident, used, free, mapped, stack in peaks[-SHOWN:]:
            print(f"{seconds:7.1f} s  resident {resident} MiB  heap in use {used} free {free}  memory-mapped {mapped}")
            print("          " + " < ".join(reversed(stack)))


if __name__ == "__main__":
    main()
