"""Interleaved timing: every candidate runs once per round (A B C A B C ...), medians over rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured in interleaved rounds after ``warmup`` untimed rounds."""
    dev = torch.device(device) if device is not None else None
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            _sync(dev)
            start = time.perf_counter()
            fn()
            _sync(dev)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
