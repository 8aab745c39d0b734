"""Timing, peak memory and FLOP counting for the benchmarks.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (reset before each
measured section, so it covers that section's models, activations and
gradients) and the process's peak resident set size on the CPU, sampled by a
background thread (freed heap is handed back to the OS with ``malloc_trim``
before each section so an earlier section's high-water mark does not count).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from contextlib import contextmanager

import torch

GIB = 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give freed memory back (CUDA cache, glibc heap) so the next section starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak`` (bytes) and ``pm.kind``."""

    def __init__(self, device: torch.device, interval: float = 0.003):
        self.device = device
        self.interval = interval
        self.peak = 0
        self.start = 0
        self.kind = "cuda max allocated" if device.type == "cuda" else "process RSS"
        self._stop = threading.Event()
        self._thread = None

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        release_memory(self.device)
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False


@contextmanager
def timer(device: torch.device, out: dict, key: str = "seconds"):
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    out[key] = time.perf_counter() - t


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as PyTorch's FlopCounterMode counts them
    (matmuls, convolutions and attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# bf16 dense matmul rate the cost model uses (an H100 reaches about 790 TFLOP/s)
KNOWN_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in KNOWN_PEAK_TFLOPS.items():
        if k in name:
            return v
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
