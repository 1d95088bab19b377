"""Peak memory of a piece of work, beyond what was in use when it started.

On CUDA this is the allocator's own peak. On a CPU we sample the process's resident set size
in a background thread (after asking the C allocator to hand freed memory back, so earlier
work does not hide in the baseline).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def trim_heap() -> None:
    """Ask the C allocator to return freed memory to the system (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.megabytes``."""

    def __init__(self, device: torch.device | str, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.megabytes = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        trim_heap()
        self.base = self.peak = _rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            peak = max(self.peak, _rss_bytes())
        self.megabytes = round((peak - self.base) / 2**20, 1)
