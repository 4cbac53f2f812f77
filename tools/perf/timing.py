"""Side-by-side timing: candidates run alternately in one process, after warm-up; medians compared.

On a shared machine an absolute time says little; a ratio of two medians taken in the same
minutes, interleaved (A B B A A B ...), cancels most of the other processes' load. With one
compute thread the time taken is the process's CPU time (the work done, not the waiting);
with more threads it is wall time (idle OpenMP threads would count as CPU time).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def clock(wall: bool = False) -> Callable[[], float]:
    return time.perf_counter if wall or torch.get_num_threads() > 1 else time.process_time


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(fns: Dict[str, Callable[[], object]], iters: int, warmup: int = 1,
              wall: bool = False) -> Dict[str, Dict[str, float]]:
    """Run each candidate `warmup` times, then `iters` rounds, the order reversed every round.
    wall: time wall-clock even with one thread (work that waits on other processes, e.g. collectives).

    Returns per candidate {"median_s", "min_s", "times_s"}.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    now = clock(wall)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = now()
            fns[name]()
            sync()
            times[name].append(now() - start)
    return {n: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for n, t in times.items()}


def speedup(res: Dict[str, Dict[str, float]], ours: str, theirs: str) -> float:
    """How many times faster `ours` is than `theirs` (median times): > 1 means ours wins."""
    return res[theirs]["median_s"] / res[ours]["median_s"]
