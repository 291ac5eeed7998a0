"""What a training process sets up on its own host, apart from the training: SIGINT/SIGTERM turned into a stop at
the next step boundary (so the save happens there), and glibc's allocator kept from returning step buffers to the OS.
No ranks, no model, no data.
"""

from __future__ import annotations

import ctypes
import signal
import threading


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps (so the save happens at a step boundary)."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. train() called from a worker thread)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def reuse_host_memory() -> bool:
    """glibc only: serve every allocation from the heap (no mmap) and never trim it back to the OS.

    A CPU train step frees and re-allocates the same large activation buffers every step; glibc's defaults serve them
    with fresh mmaps, so each step page-faults (and the kernel zeroes) hundreds of MB again: ~100k minor faults and
    ~0.2 s of system time per step at bench/throughput.py's default shape, gone with this setting (bench/RESULTS.md),
    for ~10% more peak memory. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
