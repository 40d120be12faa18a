"""A reduction config's parts, built: what :func:`make_plan` and the engine call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokred.config import ConfigSource, ReductionConfig, load_config, reduction_config_model
from tokred.errors import ConfigError, ConfigIssue
from tokred.plan import MergePlan, build_plan
from tokred.registry import Registries


@dataclass(frozen=True, eq=False)
class Reduction:
    """The selector, merge op, locality and schedule of one reduction config, built from the registries."""

    config: ReductionConfig
    selector: Any
    merge_op: Any
    locality: Any
    schedule: Any

    @classmethod
    def from_config(cls, config: ReductionConfig, registries: Registries) -> Reduction:
        missing = [key for key in ("selector", "merge", "locality", "schedule") if getattr(config, key) is None]
        if missing:
            raise ConfigError([ConfigIssue(key, "required to build plans, but not set") for key in missing])
        return cls(
            config=config,
            selector=registries.build("selector", config.selector),
            merge_op=registries.build("merge_op", config.merge),
            locality=registries.build("locality", config.locality),
            schedule=registries.build("schedule", config.schedule),
        )

    def plan(
        self,
        tokens: Tensor,
        grid: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        share_batch: bool = False,
        salt: int = 0,
    ) -> MergePlan:
        return build_plan(
            tokens,
            grid,
            selector=self.selector,
            merge_op=self.merge_op,
            locality=self.locality,
            ratio=self.config.ratio,
            generator=generator,
            share_batch=share_batch,
            salt=salt,
        )


def resolve_reduction(
    config: ConfigSource | Reduction = "toma", registries: Registries | None = None, **overrides: Any
) -> Reduction:
    """A :class:`Reduction` from a preset name, YAML path, mapping or config object, with keyword overrides."""
    if isinstance(config, Reduction) and not overrides:
        return config
    if registries is None:
        from tokred.plugins import default_registries

        registries = default_registries()
    source = config.config if isinstance(config, Reduction) else config
    if type(source) is reduction_config_model(registries) and not overrides:
        resolved = source  # validated against these registries already
    else:
        resolved = load_config(source, registries=registries, **overrides)
    return Reduction.from_config(resolved, registries)


def make_plan(
    tokens: Tensor,
    grid: tuple[int, ...],
    config: ConfigSource | Reduction = "toma",
    *,
    registries: Registries | None = None,
    generator: torch.Generator | None = None,
    share_batch: bool = False,
    **overrides: Any,
) -> MergePlan:
    """Build the merge plan of ``tokens`` (B, N, C) on an h×w ``grid`` (h·w = N).

    Args:
        config: a preset name (``"toma"``), a YAML path, a mapping, a :class:`~tokred.config.ReductionConfig` or
            a built :class:`Reduction` (fastest when planning many times).
        registries: the parts to use (the installed plugins by default).
        generator: a seeded generator for random selectors (their own ``seed`` otherwise).
        share_batch: choose one set of destinations for the whole batch, from batch-pooled features.
        overrides: reduction settings, e.g. ``ratio=0.3``.

    Example:
        >>> plan = make_plan(x, (64, 64), "toma", ratio=0.5)
        >>> y = plan.merge(x)             # (B, 2048, C)
        >>> x_back = plan.unmerge(f(y))   # (B, 4096, C)
    """
    reduction = resolve_reduction(config, registries, **overrides)
    return reduction.plan(tokens, grid, generator=generator, share_batch=share_batch)
