"""The runtime: step counter, plan cache, schedule decisions and statistics.

The engine knows nothing of diffusers: adapters tell it when the model is called (with the timestep) and ask it,
at each site, for the plan to apply to that site's tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from tokred.plan import MergePlan
from tokred.reduction import Reduction
from tokred.strategies.base import SiteInfo

logger = logging.getLogger(__name__)


@dataclass
class SiteStats:
    """Counters of one site (or of all of them, added up)."""

    calls: int = 0  # forward calls of the site's sub-layer
    merged_calls: int = 0  # calls that ran on fewer tokens
    skipped: int = 0  # calls whose tokens were not the site's whole grid (nothing to merge: see Patch docs)
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


@dataclass(eq=False)
class SiteSlot:
    """Where a site inside a compiled block finds the plan its scope's entry prepared for the current call."""

    site: SiteInfo
    plan: MergePlan | None = None


@dataclass
class _CachedPlan:
    plan: MergePlan
    built_at: int
    signature: tuple[Any, ...]


class Engine:
    """Counts denoising steps, asks the schedule, builds or reuses plans, and keeps statistics.

    Steps come from the timesteps the model is called with: a smaller timestep than the last one is the next
    step, the same one is the same step (true CFG calls the model twice per step, once per branch), a larger one
    starts a new run (a new pipeline call), which drops every cached plan. A pipeline also ends a run explicitly
    (its scheduler sets new timesteps; diffusers resets stateful hooks after the call), which is how one-step runs
    are told apart. Plans are kept per CFG branch (the pipeline's ``cache_context`` name), so the unconditional
    call never reuses a plan built from the conditional one's features.
    """

    def __init__(self, reduction: Reduction, *, time_plans: bool = False) -> None:
        self.reduction = reduction
        self.schedule = reduction.schedule
        self.time_plans = time_plans
        self.stats = Stats()
        self.step = 0
        #: whether something outside the model marks new runs (a pipeline); a bare model cannot tell a second
        #: image at the same timestep from a second CFG call, and says so once
        self.runs_watched = False
        self._last_timestep: float | None = None
        self._last_branch: str | None = None
        self._last_index: int | None = None
        self._plans: dict[object, _CachedPlan] = {}
        self._run_ended = False
        self._warned_repeat = False
        #: the CFG branch of the current call (the pipeline's cache context), set by the adapter
        self.branch_source: Callable[[], str | None] = lambda: None

    @property
    def mode(self) -> str:
        return self.reduction.config.mode

    @property
    def proportional_way(self) -> str:
        """How merged keys get log(size) added to their attention logits: auto, fold, mask, flex or off."""
        return self.reduction.config.proportional

    @torch.compiler.disable
    def begin_model_call(self, timestep: Tensor | float | int | None, step_index: int | None = None) -> None:
        """Called by the adapter before each forward of the model.

        ``step_index`` is the pipeline scheduler's own count when there is one (read without touching a tensor);
        otherwise the step is worked out from the timestep (one read back from the device on a GPU).
        """
        branch = self.branch_source()
        self.stats.model_calls += 1
        if self._run_ended:
            self._run_ended = False
            self.step = 0
            self._last_timestep = None
            self._last_index = None
            self._plans.clear()
        if step_index is not None:
            if self._last_index is None or step_index != self._last_index:
                self.stats.steps += 1
            if self._last_index is not None and step_index < self._last_index:
                self._plans.clear()  # the scheduler started over without set_timesteps
            self.step = step_index
            self._last_index = step_index
            return
        if timestep is None:
            return
        # the largest entry: Wan 2.2 TI2V gives a timestep per token, 0 on the conditioning frame's tokens
        value = float(timestep.reshape(-1).max()) if isinstance(timestep, Tensor) else float(timestep)
        if self._last_timestep is None or value > self._last_timestep:
            self.step = 0
            self._plans.clear()
            self.stats.steps += 1
        elif value < self._last_timestep:
            self.step += 1
            self.stats.steps += 1
        elif branch == self._last_branch and not self.runs_watched and not self._warned_repeat:
            self._warned_repeat = True
            logger.warning(
                "tokred: the model was called twice in a row at timestep %s. On a bare model tokred cannot tell a "
                "new image at the same timestep (one-step and few-step models) from a second call of the same "
                "step, and keeps reusing this run's plans; call patch.new_run() before each new image, or apply "
                "tokred to the pipeline.",
                value,
            )
        self._last_timestep = value
        self._last_branch = branch

    def new_run(self) -> None:
        """The current denoising run is over (a pipeline call ended, or the next one set its timesteps).

        The next model call starts at step 0 with no cached plan; until then the last run's plans stay readable
        (for pictures and tests).
        """
        self._run_ended = True

    @property
    def plans(self) -> list[MergePlan]:
        """The plans cached now (the current run's, or the last one's until the next call)."""
        return [cached.plan for cached in self._plans.values()]

    def reset(self) -> None:
        """Forget the step count and cached plans, and zero the statistics."""
        self.step = 0
        self._last_timestep = None
        self._last_branch = None
        self._last_index = None
        self._plans.clear()
        self._run_ended = False
        self.stats.reset()

    @torch.compiler.disable
    def plan_for(
        self,
        site: SiteInfo,
        tokens: Tensor,
        grid: tuple[int, ...] | None,
        *,
        share_batch: bool = False,
    ) -> MergePlan | None:
        """The plan this site applies to ``tokens`` (B, N, C) now, or ``None`` to run it unchanged."""
        stats = self.stats.site(site.name)
        stats.calls += 1
        if grid is None or tokens.shape[1] != math.prod(grid):
            stats.skipped += 1  # not the whole grid (a chunked feed-forward, ids that are no grid, ...)
            return None
        if not self.schedule.merges(self.step, site):
            return None
        plan = self._plan(site, tokens, grid, share_batch, stats)
        if plan.is_identity:
            return None
        stats.merged_calls += 1
        stats.tokens_in += plan.num_tokens
        stats.tokens_out += plan.num_destinations
        return plan

    def _plan(
        self, site: SiteInfo, tokens: Tensor, grid: tuple[int, ...], share_batch: bool, stats: SiteStats
    ) -> MergePlan:
        key = (self.branch_source(), self.schedule.share_key(site, grid))
        signature = (tokens.shape[0], tokens.shape[1], tokens.device, share_batch)
        cached = self._plans.get(key)
        if (
            cached is not None
            and cached.signature == signature
            and not self.schedule.rebuilds(self.step, cached.built_at)
        ):
            stats.plan_reuses += 1
            return cached.plan
        plan = self._build(tokens, grid, share_batch, stats)
        self._plans[key] = _CachedPlan(plan, self.step, signature)
        return plan

    @torch.compiler.disable
    def prepare(self, slots: list[SiteSlot], tokens: Tensor | None, grid: tuple[int, ...] | None) -> None:
        """Before compiled blocks run: the plan of every slot for this call, from the scope's entry ``tokens``.

        The counters count every site scheduled to run; a site inside a skipped (cached) block is counted too.
        """
        for slot in slots:
            slot.plan = None
            stats = self.stats.site(slot.site.name)
            stats.calls += 1
            if tokens is None or grid is None or tokens.shape[1] != math.prod(grid):
                stats.skipped += 1
                continue
            if not self.schedule.merges(self.step, slot.site):
                continue
            plan = self._plan(slot.site, tokens, grid, False, stats)
            if plan.is_identity:
                continue
            plan.prepare(tokens.dtype)  # casts made now, outside the graph
            slot.plan = plan
            stats.merged_calls += 1
            stats.tokens_in += plan.num_tokens
            stats.tokens_out += plan.num_destinations

    def _build(self, tokens: Tensor, grid: tuple[int, ...], share_batch: bool, stats: SiteStats) -> MergePlan:
        stats.plan_builds += 1
        start = self._clock(tokens) if self.time_plans else 0.0
        # plans are float32 by design: autocast must not turn the similarity products into half precision
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            plan = self.reduction.plan(tokens.detach(), grid, share_batch=share_batch, salt=self.step)
        if self.time_plans:
            stats.build_seconds += self._clock(tokens) - start
        return plan

    @staticmethod
    def _clock(tokens: Tensor) -> float:
        if tokens.device.type == "cuda":
            torch.cuda.synchronize(tokens.device)
        return time.perf_counter()
