"""The runtime: step counter, plan cache, schedule decisions and statistics.

The engine knows nothing of diffusers: adapters tell it when the model is called (with the timestep) and ask it,
at each site, for the plan to apply to that site's tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from tokred.plan import MergePlan
from tokred.reduction import Reduction
from tokred.strategies.base import SiteInfo


@dataclass
class SiteStats:
    """Counters of one site (or of all of them, added up)."""

    calls: int = 0  # forward calls of the site's sub-layer
    merged_calls: int = 0  # calls that ran on fewer tokens
    tokens_in: int = 0  # tokens entering the merged calls, summed over calls
    tokens_out: int = 0  # tokens the sub-layer ran on in those calls
    plan_builds: int = 0
    plan_reuses: int = 0
    build_seconds: float = 0.0  # only counted when the patch times plan building

    def add(self, other: SiteStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def kept_fraction(self) -> float:
        """tokens_out / tokens_in of the merged calls (1.0 when nothing merged)."""
        return self.tokens_out / self.tokens_in if self.tokens_in else 1.0


@dataclass
class Stats:
    """Per-site counters and their total. ``reset()`` zeroes them."""

    sites: dict[str, SiteStats] = field(default_factory=dict)
    model_calls: int = 0
    steps: int = 0

    def site(self, name: str) -> SiteStats:
        if name not in self.sites:
            self.sites[name] = SiteStats()
        return self.sites[name]

    @property
    def total(self) -> SiteStats:
        total = SiteStats()
        for stats in self.sites.values():
            total.add(stats)
        return total

    def reset(self) -> None:
        self.sites.clear()
        self.model_calls = 0
        self.steps = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_calls": self.model_calls,
            "steps": self.steps,
            "total": asdict(self.total),
            "sites": {name: asdict(stats) for name, stats in self.sites.items()},
        }


@dataclass
class _CachedPlan:
    plan: MergePlan
    built_at: int
    signature: tuple[Any, ...]


class Engine:
    """Counts denoising steps, asks the schedule, builds or reuses plans, and keeps statistics.

    Steps come from the timesteps the model is called with: a smaller timestep than the last one is the next
    step, the same one is the same step (true CFG calls the model twice per step), a larger one starts a new
    run (a new pipeline call), which drops every cached plan.
    """

    def __init__(self, reduction: Reduction, *, time_plans: bool = False) -> None:
        self.reduction = reduction
        self.schedule = reduction.schedule
        self.time_plans = time_plans
        self.stats = Stats()
        self.step = 0
        self._last_timestep: float | None = None
        self._plans: dict[object, _CachedPlan] = {}
        self._run_ended = False

    @property
    def mode(self) -> str:
        return self.reduction.config.mode

    @property
    def proportional(self) -> bool:
        """Whether merged keys get log(size) added to their attention logits."""
        return self.reduction.config.proportional

    def begin_model_call(self, timestep: Tensor | float | int | None) -> None:
        """Called by the adapter before each forward of the model."""
        self.stats.model_calls += 1
        if self._run_ended:
            self._run_ended = False
            self.step = 0
            self._last_timestep = None
            self._plans.clear()
        if timestep is None:
            return
        value = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep)
        if self._last_timestep is None or value > self._last_timestep:
            self.step = 0
            self._plans.clear()
            self.stats.steps += 1
        elif value < self._last_timestep:
            self.step += 1
            self.stats.steps += 1
        self._last_timestep = value

    def new_run(self) -> None:
        """The current denoising run is over (a pipeline call ended, or the next one set its timesteps).

        The next model call starts at step 0 with no cached plan; until then the last run's plans stay readable
        (for pictures and tests).
        """
        self._run_ended = True

    def reset(self) -> None:
        """Forget the step count and cached plans, and zero the statistics."""
        self.step = 0
        self._last_timestep = None
        self._plans.clear()
        self._run_ended = False
        self.stats.reset()

    def plan_for(
        self, site: SiteInfo, tokens: Tensor, grid: tuple[int, int] | None, *, share_batch: bool = False
    ) -> MergePlan | None:
        """The plan this site applies to ``tokens`` (B, N, C) now, or ``None`` to run it unchanged."""
        stats = self.stats.site(site.name)
        stats.calls += 1
        if grid is None or tokens.shape[1] != grid[0] * grid[1] or not self.schedule.merges(self.step, site):
            return None  # not a merging step or block, or not the whole grid (a chunked feed-forward, say)
        key = self.schedule.share_key(site, grid)
        signature = (tokens.shape[0], tokens.shape[1], tokens.device, share_batch)
        cached = self._plans.get(key)
        if (
            cached is not None
            and cached.signature == signature
            and not self.schedule.rebuilds(self.step, cached.built_at)
        ):
            plan = cached.plan
            stats.plan_reuses += 1
        else:
            plan = self._build(tokens, grid, share_batch, stats)
            self._plans[key] = _CachedPlan(plan, self.step, signature)
        if plan.is_identity:
            return None
        stats.merged_calls += 1
        stats.tokens_in += plan.num_tokens
        stats.tokens_out += plan.num_destinations
        return plan

    def _build(self, tokens: Tensor, grid: tuple[int, int], share_batch: bool, stats: SiteStats) -> MergePlan:
        stats.plan_builds += 1
        timed = self.time_plans
        if timed and tokens.device.type == "cuda":
            torch.cuda.synchronize(tokens.device)
        start = time.perf_counter()
        # plans are float32 by design: autocast must not turn the similarity products into half precision
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            plan = self.reduction.plan(tokens.detach(), grid, share_batch=share_batch, salt=self.step)
        if timed:
            if tokens.device.type == "cuda":
                torch.cuda.synchronize(tokens.device)
            stats.build_seconds += time.perf_counter() - start
        return plan
