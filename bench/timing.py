"""Timers: median and p20/p80 of repeated calls, and the machine's copy bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    ms: float
    ms_p20: float
    ms_p80: float


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def time_cpu(fn: Callable[[], object], *, budget_s: float = 1.0, min_reps: int = 5) -> Timing:
    """Warm up (first calls compile, allocate, fill caches), then time calls until the
    budget is spent, at least ``min_reps`` and at most 200 of them."""
    fn()
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    reps = max(min_reps, min(200, int(budget_s / max(warm, 1e-6))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def time_cuda(fn: Callable[[], object]) -> Timing:
    import triton.testing

    ms, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return Timing(ms, p20, p80)


def time_fn(fn: Callable[[], object], device: torch.device, budget_s: float) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn)
    return time_cpu(fn, budget_s=budget_s)


def time_once_with_peak(
    fn: Callable[[], object], device: torch.device, peak_bytes: Callable, repeats: int = 1
) -> tuple[Timing, int | None]:
    """``repeats`` timed calls (for cases of seconds per call): their median and p20/p80, and
    the peak memory the first one added."""
    return time_in_turns_with_peak([fn], device, peak_bytes, repeats)[0]


def time_in_turns_with_peak(
    fns: list[Callable[[], object]], device: torch.device, peak_bytes: Callable, repeats: int
) -> list[tuple[Timing, int | None]]:
    """``time_once_with_peak`` of several calls timed in turns: round r times the r-th call of
    each of ``fns``, in order in even rounds and in reverse order in odd ones (A B, B A, ...),
    so that a drift of the machine's speed during the rounds (a shared VM's speed can move by
    tens of percent within minutes) and whatever one call leaves for the next fall on all of
    them alike. Returns (timing, peak memory of its first call) per function."""
    elapsed: list[list[float]] = [[] for _ in fns]

    def timed(k: int) -> Callable[[], None]:
        def call() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[k]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed[k].append((time.perf_counter() - start) * 1e3)

        return call

    peaks = [peak_bytes(timed(k), device) for k in range(len(fns))]
    for r in range(1, repeats):
        for k in reversed(range(len(fns))) if r % 2 else range(len(fns)):
            timed(k)()
    out = []
    for samples, peak in zip(elapsed, peaks, strict=True):
        timing = Timing(
            statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8)
        )
        out.append((timing, peak))
    return out


def copy_bandwidth_gbps(device: torch.device, budget_s: float, nbytes: int = 1 << 28) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written): the "peak" of this run."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, budget_s)
    return 2 * nbytes / (timing.ms * 1e-3) / 1e9
