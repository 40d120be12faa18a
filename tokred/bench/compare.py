"""Side-by-side comparison of methods on one model and one input, measured in one run.

Each method is attached, the model is called, and the method is detached, in interleaved rounds (A B C A B C
…), so every ratio compares measurements taken under the same conditions. A first, untimed round records each
method's output (deviation from the baseline's) and FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokred.bench.flops import count_flops
from tokred.bench.inputs import output_tensor
from tokred.bench.timing import median


@dataclass
class Method:
    """One way of running the model: the baseline, a tokred config, a peer (tomesd), a step cache, or a tokred config
    under a step cache."""

    name: str
    kind: str = "tokred"  # baseline | tokred | tomesd | cache
    config: Any = None  # tokred: preset / mapping / config; tomesd: keyword arguments of apply_patch
    overrides: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None  # a name of tokred.bench.caches.CACHES, switched on before tokred
    steps: int = 1  # denoising steps of one measured call (caches need several)
    cache_settings: dict[str, Any] = field(default_factory=dict)  # the cache's settings over its defaults

    def attach(self, model: torch.nn.Module, time_plans: bool = False) -> Any:
        if self.cache is not None:
            from tokred.bench.caches import CACHES

            cache = CACHES[self.cache]
            cache.enable(model, self.steps, cache.settings(self.cache_settings))
        if self.kind == "baseline" or (self.kind == "cache" and self.config is None):
            return None
        if self.kind == "tomesd":
            import tomesd

            tomesd.apply_patch(model, **(self.config or {}))
            return None
        import tokred

        return tokred.apply(model, self.config, time_plans=time_plans, **self.overrides)

    def detach(self, model: torch.nn.Module, handle: Any) -> None:
        if self.kind == "tomesd":
            import tomesd

            tomesd.remove_patch(model)
        elif handle is not None:
            handle.remove()
        if self.cache is not None:
            from tokred.bench.caches import CACHES

            CACHES[self.cache].disable(model)


@dataclass
class Row:
    name: str
    seconds: float  # median per call
    flops: int
    deviation: float  # ||out - baseline|| / ||baseline||
    speedup: float = 1.0
    flop_speedup: float = 1.0
    plan_seconds: float = 0.0  # time building plans in one call, from the first timed round (tokred only)
    tokens_kept: float = 1.0  # tokens_out / tokens_in over merged calls (tokred only)
    peak_memory: float | None = None  # GiB allocated at most during one call (CUDA only)
    times: list[float] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """Measured speedup / FLOP-model speedup."""
        return self.speedup / self.flop_speedup if self.flop_speedup else float("nan")

    @property
    def plan_share(self) -> float:
        return self.plan_seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "speedup": self.speedup,
            "flops": self.flops,
            "flop_speedup": self.flop_speedup,
            "efficiency": self.efficiency,
            "deviation": self.deviation,
            "plan_seconds": self.plan_seconds,
            "plan_share": self.plan_share,
            "tokens_kept": self.tokens_kept,
            "peak_memory": self.peak_memory,
            "times": self.times,
        }


class Clock:
    """Seconds of one call: CUDA events on a GPU (after everything queued before is done), the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def compare(
    model: torch.nn.Module,
    call: Callable[[], Any],
    methods: Sequence[Method],
    *,
    repeats: int = 3,
    warmup: int = 0,
    progress: Callable[[str], object] | None = None,
) -> list[Row]:
    """Compare ``methods`` (the first must be the baseline) on ``call()``; medians over ``repeats`` rounds.

    A first untimed round records each method's output, FLOPs and (on CUDA) peak memory; ``warmup`` more untimed
    rounds follow; then the timed rounds run interleaved (A B C A B C ...).
    """
    if not methods or methods[0].kind != "baseline":
        raise ValueError("the first method must be the baseline")
    device = next(model.parameters()).device
    clock = Clock(device)
    outputs: dict[str, Tensor] = {}
    flops: dict[str, int] = {}
    kept: dict[str, float] = {}
    peaks: dict[str, float] = {}
    plan_seconds: dict[str, float] = {}
    for method in methods:  # untimed: outputs, FLOPs, peak memory
        handle = method.attach(model)
        try:
            with torch.no_grad():
                result, flops[method.name] = count_flops(call)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    result = call()
                    torch.cuda.synchronize()
                    peaks[method.name] = torch.cuda.max_memory_allocated(device) / 2**30
            outputs[method.name] = output_tensor(result).float()
            if handle is not None:
                kept[method.name] = handle.stats.total.kept_fraction
        finally:
            method.detach(model, handle)
        if progress is not None:
            progress(f"{method.name}: outputs and FLOPs")
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        for method in methods:
            # plan-building time is taken in the first timed round only: timing it synchronises CUDA around builds
            first = round_index == warmup
            handle = method.attach(model, time_plans=first)
            try:
                with torch.no_grad():
                    seconds = clock.time(call)
                if timed:
                    times[method.name].append(seconds)
                if handle is not None and first:
                    plan_seconds[method.name] = handle.stats.total.build_seconds
            finally:
                method.detach(model, handle)
            if progress is not None:
                what = f"round {round_index - warmup + 1}/{repeats}" if timed else "warm-up"
                progress(f"{what}: {method.name}")
    base = outputs[methods[0].name]
    base_time = median(times[methods[0].name])
    base_flops = flops[methods[0].name]
    rows = []
    for method in methods:
        out = outputs[method.name]
        seconds = median(times[method.name])
        rows.append(
            Row(
                name=method.name,
                seconds=seconds,
                flops=flops[method.name],
                deviation=float((out - base).norm() / base.norm().clamp_min(1e-30)),
                speedup=base_time / seconds,
                flop_speedup=base_flops / flops[method.name] if flops[method.name] else float("nan"),
                plan_seconds=plan_seconds.get(method.name, 0.0),
                tokens_kept=kept.get(method.name, 1.0),
                peak_memory=peaks.get(method.name),
                times=times[method.name],
            )
        )
    return rows


def format_rows(rows: Sequence[Row]) -> str:
    memory = any(row.peak_memory is not None for row in rows)
    width = max([14, *(len(row.name) for row in rows)])
    head = (
        f"{'method':<{width}} {'time s':>8} {'speedup':>8} {'FLOP model':>10} {'efficiency':>10} {'deviation':>10} "
        f"{'plan share':>10}"
    )
    lines = [head + (f" {'peak GiB':>9}" if memory else "")]
    for row in rows:
        line = (
            f"{row.name:<{width}} {row.seconds:>8.3f} {row.speedup:>7.2f}x {row.flop_speedup:>9.2f}x "
            f"{row.efficiency:>10.2f} {row.deviation:>10.4f} {100 * row.plan_share:>9.1f}%"
        )
        if memory:
            line += f" {row.peak_memory:>9.2f}" if row.peak_memory is not None else f" {'-':>9}"
        lines.append(line)
    return "\n".join(lines)
