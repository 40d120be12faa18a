"""The public patch API: ``apply``, ``remove``, ``patched`` and :class:`Patch`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from tokred.config import ConfigSource, ReductionConfig
from tokred.engine import Engine, Stats
from tokred.errors import TokredError
from tokred.reduction import Reduction, resolve_reduction
from tokred.registry import Registries
from tokred.strategies.base import SiteInfo

DENOISER_ATTRIBUTES = ("unet", "transformer")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper holds (hooks go on it; the wrapper recompiles around them)."""
    return getattr(module, "_orig_mod", module)


def find_denoiser(target: Any) -> torch.nn.Module:
    """The model to patch: ``target`` itself if it is a module, else its ``unet`` or ``transformer``."""
    if isinstance(target, torch.nn.Module):
        return _unwrap(target)
    for name in DENOISER_ATTRIBUTES:
        module = getattr(target, name, None)
        if isinstance(module, torch.nn.Module):
            return _unwrap(module)
    raise TokredError(
        f"cannot patch a {type(target).__qualname__}: expected a diffusers pipeline with a "
        f"{' or '.join(DENOISER_ATTRIBUTES)} component, or a denoiser model (torch.nn.Module)"
    )


class Patch:
    """tokred applied to one model: its engine, sites and statistics. ``remove()`` undoes it exactly."""

    def __init__(
        self, model: torch.nn.Module, adapter: str, engine: Engine, sites: list[SiteInfo], scheduler: Any = None
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.engine = engine
        self.sites = sites
        self.scheduler = scheduler  # the pipeline's scheduler, whose set_timesteps marks a new run

    @property
    def config(self) -> ReductionConfig:
        """The reduction config this patch runs."""
        return self.engine.reduction.config

    @property
    def stats(self) -> Stats:
        """Per-site and total counters: calls, tokens in/out, plan builds and reuses, build time."""
        return self.engine.stats

    @property
    def active(self) -> bool:
        """Whether this patch's hooks are all in place (False once removed or replaced, and for a ratio-0 patch,
        which registers nothing)."""
        from tokred.adapters.hooks import tokred_hooks

        mine = [(module, hook) for module, _, hook in tokred_hooks(self.model) if hook.engine is self.engine]
        return bool(mine) and all(hook.in_place(module) for module, hook in mine)

    def reset(self) -> None:
        """Zero the statistics and forget the step count and cached plans."""
        self.engine.reset()

    def new_run(self) -> None:
        """Tell the patch that a new image starts: the next model call is step 0, with fresh plans.

        A patched pipeline does this itself; call it between images when you drive a bare model, where tokred
        cannot tell a new image at the same timestep (one-step and few-step models) from a second call of a step.
        """
        self.engine.new_run()

    def remove(self) -> None:
        """Remove this patch's hooks (a no-op when another patch already replaced it)."""
        from tokred.adapters.hooks import remove_hooks

        remove_hooks(self.model, self.engine)
        _unwatch_runs(self.scheduler, self.engine)

    def __repr__(self) -> str:
        return (
            f"Patch(model={type(self.model).__name__}, adapter={self.adapter!r}, sites={len(self.sites)}, "
            f"ratio={self.config.ratio}, mode={self.config.mode!r}, active={self.active})"
        )


def _registries(registries: Registries | None) -> Registries:
    if registries is not None:
        return registries
    from tokred.plugins import default_registries

    return default_registries()


def resolve_adapter_name(model: torch.nn.Module, registries: Registries) -> str:
    pm = registries.plugin_manager
    name = pm.hook.resolve_adapter(model=model) if pm is not None else None
    if name is None:
        available = ", ".join(registries["adapter"].names()) or "none"
        raise TokredError(f"no tokred adapter handles {type(model).__qualname__}; available adapters: {available}")
    return name


def apply(
    target: Any,
    config: ConfigSource | Reduction = "toma",
    *,
    registries: Registries | None = None,
    time_plans: bool = False,
    **overrides: Any,
) -> Patch:
    """Apply token reduction to a diffusers pipeline or denoiser; replaces any earlier patch.

    Important args:
        target: a pipeline (its ``unet`` or ``transformer`` is patched) or a denoiser model.
        config: a preset name (``"toma"``, ``"toma_flux"``), a YAML path, a mapping or a reduction config.
        overrides: reduction settings, most often ``ratio`` (fraction of tokens removed), ``sites``
            (``attn1``, ``attn2``, ``ff``) and ``mode`` (``tokens`` or ``kv``). Generation settings (``steps``,
            ``prompt``, ...) belong to the pipeline call and are refused with a :class:`ConfigError` saying so.

    Args to tinker with:
        registries: the parts to use (the installed plugins by default).
        time_plans: measure the time spent building plans (synchronises CUDA around each build).

    Example:
        >>> patch = tokred.apply(pipe, "toma", ratio=0.5)
        >>> image = pipe(prompt).images[0]
        >>> patch.stats.total.plan_reuses
        >>> tokred.remove(pipe)
    """
    from tokred.adapters.hooks import StepHook, invalidate_registry_caches, tokred_hooks

    registries = _registries(registries)
    model = find_denoiser(target)
    reduction = resolve_reduction(config, registries, **overrides)
    adapter_name, adapter = _adapter_for(model, reduction.config, registries)
    adapter.check(reduction.config)  # a config the adapter refuses leaves any earlier patch in place
    remove(target)
    engine = Engine(reduction, time_plans=time_plans)
    if reduction.config.ratio == 0:
        return Patch(model, adapter_name, engine, [])  # nothing to reduce: the model is left untouched
    try:
        sites = adapter.attach(model, engine, reduction.config)
        if not sites:
            raise TokredError(
                f"adapter {adapter_name!r} found no site in {type(model).__qualname__} for sites "
                f"{list(reduction.config.sites)}"
            )
        invalidate_registry_caches(model)  # so diffusers' cache contexts and resets reach the new hooks
    except BaseException:
        adapter.detach(model, engine)  # nothing half-applied stays behind
        raise
    scheduler = _watch_runs(target, engine)
    engine.runs_watched = scheduler is not None
    for _, _, hook in tokred_hooks(model):
        if isinstance(hook, StepHook) and hook.engine is engine:
            hook.scheduler = scheduler
    return Patch(model, adapter_name, engine, sites, scheduler)


def _adapter_for(model: torch.nn.Module, config: ReductionConfig, registries: Registries) -> tuple[str, Any]:
    """The adapter the config names (``adapter: {name: ...}``), else the one that claims the model."""
    section = getattr(config, "adapter", None)
    if section is None:
        name = resolve_adapter_name(model, registries)
        return name, registries.part("adapter", name).build()
    adapter = registries.build("adapter", section)
    handles = getattr(adapter, "handles", None)
    if handles is not None and not handles(model):
        raise TokredError(f"adapter {section.name!r} (set by the config) does not handle {type(model).__qualname__}")
    return section.name, adapter


def _watch_runs(target: Any, engine: Engine) -> Any:
    """Have the pipeline's ``scheduler.set_timesteps`` (called once at the start of every pipeline call) tell the
    engine that a new run starts, so even one-step runs never reuse the previous image's plans. Returns the
    scheduler, or None when ``target`` is a bare model (then runs are told apart by their timesteps alone)."""
    scheduler = getattr(target, "scheduler", None)
    original = getattr(scheduler, "set_timesteps", None)
    if isinstance(target, torch.nn.Module) or original is None:
        return None

    @functools.wraps(original)
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        engine.new_run()
        return original(*args, **kwargs)

    set_timesteps._tokred_engine = engine  # type: ignore[attr-defined]
    scheduler.set_timesteps = set_timesteps
    return scheduler


def _unwatch_runs(scheduler: Any, engine: Engine | None = None) -> None:
    wrapper = getattr(scheduler, "__dict__", {}).get("set_timesteps")
    owner = getattr(wrapper, "_tokred_engine", None)
    if owner is not None and (engine is None or owner is engine):
        del scheduler.__dict__["set_timesteps"]


def remove(target: Any) -> bool:
    """Remove every tokred hook from the pipeline or model; True if there was any."""
    from tokred.adapters.hooks import remove_hooks

    _unwatch_runs(getattr(target, "scheduler", None))
    return remove_hooks(find_denoiser(target)) > 0


@contextlib.contextmanager
def patched(
    target: Any, config: ConfigSource | Reduction = "toma", *, registries: Registries | None = None, **overrides: Any
) -> Iterator[Patch]:
    """``with tokred.patched(pipe, "toma", ratio=0.5) as patch: ...`` — removed on exit, even on error."""
    patch = apply(target, config, registries=registries, **overrides)
    try:
        yield patch
    finally:
        patch.remove()
