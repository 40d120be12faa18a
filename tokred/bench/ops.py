"""``tokred bench-ops``: the cost of the algebra against the attention it shortens, and the quality of selectors.

Everything is measured in one run: for each case the candidates run interleaved (attention, plan, merge,
unmerge, attention, plan, ...) and medians are reported, so ratios compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokred.bench.synthetic import smooth_tokens
from tokred.bench.timing import median, time_interleaved
from tokred.reduction import resolve_reduction

LOCALITIES: dict[str, dict[str, Any]] = {
    "tiles8": {"name": "tiles", "size": [8, 8]},
    "tiles4": {"name": "tiles", "size": [4, 4]},
    "stripes8": {"name": "stripes", "count": 8},
    "global": {"name": "global"},
}
SELECTORS = ("toma", "random", "grid")


@dataclass
class CostRow:
    channels: int
    heads: int
    locality: str
    attention_ms: float
    plan_ms: float
    merge_ms: float
    unmerge_ms: float
    built_merge_ms: float  # a plan built and the same tokens merged, as a site does on a step that builds
    repeats: int

    @property
    def overhead_share(self) -> float:
        """(plan built + merge of the same tokens + unmerge) / attention on the full sequence."""
        return (self.built_merge_ms + self.unmerge_ms) / self.attention_ms

    @property
    def apply_share(self) -> float:
        """(merge + unmerge) / attention: the overhead once a plan is reused."""
        return (self.merge_ms + self.unmerge_ms) / self.attention_ms


@dataclass
class QualityRow:
    selector: str
    locality: str
    objective: float  # mean over tokens of max_{j in D, same group} (cos+1)/2
    reconstruction: float  # ||unmerge(merge(x)) - x|| / ||x||


def coverage(x: torch.Tensor, plan: Any, layout: Any) -> float:
    """Facility-location objective per token: mean_i max over destinations j of i's group of (cos(i, j) + 1) / 2."""
    group_of = torch.empty(layout.num_tokens, dtype=torch.long)
    group_of[layout.index[layout.valid]] = torch.arange(layout.num_groups).repeat_interleave(layout.counts)
    xn = F.normalize(x.float(), dim=-1)
    total = 0.0
    for b in range(x.shape[0]):
        dst = plan.destinations[min(b, plan.destinations.shape[0] - 1)].cpu()
        s = (xn[b] @ xn[b, dst].T + 1) / 2  # (N, D)
        same = group_of.unsqueeze(1) == group_of[dst].unsqueeze(0)
        total += float(s.masked_fill(~same, 0).amax(-1).mean())
    return total / x.shape[0]


def run_bench_ops(
    *,
    batch: int = 2,
    grid: tuple[int, int] = (64, 64),
    sizes: Sequence[tuple[int, int]] = ((640, 10), (3072, 24)),
    localities: Sequence[str] = ("tiles8", "tiles4", "global"),
    ratio: float = 0.5,
    repeats: int = 5,
    slow_repeats: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_case: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Measure plan / merge / unmerge against full-sequence attention, and selector quality.

    ``slow_repeats`` applies to the global locality, whose exact greedy selection is O(d·N²).
    """
    unknown = [name for name in localities if name not in LOCALITIES]
    if unknown:
        raise ValueError(f"unknown locality {unknown[0]!r}; available: {', '.join(LOCALITIES)}")
    n = grid[0] * grid[1]
    costs: list[CostRow] = []
    quality: list[QualityRow] = []
    for channels, heads in sizes:
        x = smooth_tokens(grid, channels, batch=batch, seed=0, dtype=dtype, device=device)
        q, k, v = (
            torch.randn(batch, heads, n, channels // heads, dtype=dtype, device=device, generator=None)
            for _ in range(3)
        )
        for name in localities:
            reduction = resolve_reduction("toma", ratio=ratio, locality=LOCALITIES[name])
            plan = reduction.plan(x, grid)
            merged = plan.merge(x)
            slow = name == "global"
            times = time_interleaved(
                {
                    "attention": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                    "plan": lambda s=reduction, x=x: s.plan(x, grid),
                    "merge": lambda p=plan, x=x: p.merge(x),
                    "unmerge": lambda p=plan, y=merged: p.unmerge(y),
                    "built_merge": lambda s=reduction, x=x: s.plan(x, grid).merge(x),
                },
                repeats=slow_repeats if slow else repeats,
                warmup=0 if slow else 1,
                device=device,
            )
            costs.append(
                CostRow(
                    channels,
                    heads,
                    name,
                    *(1000 * median(times[key]) for key in times),
                    repeats=slow_repeats if slow else repeats,
                )
            )
            if channels == sizes[0][0]:
                layout = reduction.locality.partition(grid)
                for selector in SELECTORS:
                    chosen = (
                        plan
                        if selector == "toma"
                        else resolve_reduction("toma", ratio=ratio, locality=LOCALITIES[name], selector=selector).plan(
                            x, grid
                        )
                    )
                    restored = chosen.unmerge(chosen.merge(x))
                    error = float((restored - x).float().norm() / x.float().norm())
                    quality.append(QualityRow(selector, name, coverage(x.cpu(), chosen, layout), error))
            if on_case is not None:
                on_case(f"C={channels} {name} done")
    return {
        "setup": {
            "batch": batch,
            "grid": list(grid),
            "tokens": n,
            "ratio": ratio,
            "repeats": repeats,
            "slow_repeats": slow_repeats,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "costs": [
            {**asdict(row), "overhead_share": row.overhead_share, "apply_share": row.apply_share} for row in costs
        ],
        "quality": [asdict(row) for row in quality],
    }


def format_report(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"tokred bench-ops: B={setup['batch']}, N={setup['tokens']} ({setup['grid'][0]}x{setup['grid'][1]}), "
        f"ratio {setup['ratio']}, {setup['device']} {setup['dtype']}, {setup['threads']} threads, "
        f"median of {setup['repeats']} interleaved repeats (global: {setup['slow_repeats']})",
        "",
        f"{'C':>5} {'heads':>5} {'locality':<9} {'attention ms':>12} {'plan ms':>9} {'merge ms':>9} "
        f"{'unmerge ms':>10} {'plan+merge ms':>13} {'overhead':>9} {'reused':>7}",
    ]
    for row in report["costs"]:
        lines.append(
            f"{row['channels']:>5} {row['heads']:>5} {row['locality']:<9} {row['attention_ms']:>12.1f} "
            f"{row['plan_ms']:>9.2f} {row['merge_ms']:>9.2f} {row['unmerge_ms']:>10.2f} "
            f"{row['built_merge_ms']:>13.2f} {100 * row['overhead_share']:>8.1f}% {100 * row['apply_share']:>6.1f}%"
        )
    lines += [
        "plan+merge = a plan built and the same tokens merged, as a site does when it builds (the build's slot copy is"
        " reused);",
        "overhead = (plan+merge + unmerge) / attention;  reused = (merge + unmerge) / attention, once a plan is reused",
        "",
        f"selector quality on structured input (C={report['costs'][0]['channels'] if report['costs'] else '?'}):",
        f"{'locality':<9} {'selector':<8} {'objective':>10} {'reconstruction':>15}",
    ]
    for row in report["quality"]:
        lines.append(
            f"{row['locality']:<9} {row['selector']:<8} {row['objective']:>10.4f} {row['reconstruction']:>15.4f}"
        )
    lines.append(
        "objective = mean facility-location coverage per token (higher is better); "
        "reconstruction = ||unmerge(merge(x)) - x|| / ||x|| (lower is better)"
    )
    return "\n".join(lines)


def check_targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets, each as a line saying met or missed and by how much."""
    out = []
    for row in report["costs"]:
        if row["locality"] == "tiles8" and row["channels"] == 640:
            share = row["overhead_share"]
            verdict = "met" if share <= 0.05 else f"missed by {100 * (share - 0.05):.1f} points"
            out.append(f"overhead at tiles 8x8, C=640: {100 * share:.1f}% (target <= 5%): {verdict}")
    by = {(r["locality"], r["selector"]): r for r in report["quality"]}
    for locality in dict.fromkeys(r["locality"] for r in report["quality"]):
        toma = by.get((locality, "toma"))
        others = [by[(locality, s)] for s in ("random", "grid") if (locality, s) in by]
        if toma and others:
            better = all(
                toma["objective"] > o["objective"] and toma["reconstruction"] < o["reconstruction"] for o in others
            )
            out.append(
                f"toma better than random and grid at {locality} (objective and reconstruction): "
                f"{'yes' if better else 'no'}"
            )
    return out
