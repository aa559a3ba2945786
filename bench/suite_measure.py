"""Memory and time on either device, for the GPU suite: CUDA's allocator counters on a GPU, torch.profiler's
memory events on the CPU, so that the same sections run (and are checked) on both.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it counts the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    """CUDA's allocated bytes now; 0 on the CPU, which has no such counter."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Peak:
    """Peak bytes allocated during the block above what was allocated at its start.

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of torch.profiler memory events.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra = 0
        self.seconds = 0.0

    def __enter__(self) -> Peak:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
            self.end = torch.cuda.memory_allocated(self.device) - self.start
        else:
            self._prof.__exit__(*exc)
            events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU]
            events.sort(key=lambda e: e.start_ns())
            cur = peak = 0
            for e in events:
                cur += e.nbytes()
                peak = max(peak, cur)
            self.extra, self.end = peak, cur


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds that fn takes, with the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
