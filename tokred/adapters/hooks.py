"""The hooks the adapters share: where tokred attaches to a model, and how a site gets its plan.

Three kinds, each chosen for what it must survive:

- **Entry hooks** (step, grid) read a call's inputs at the model and at each scope (a UNet stage). They are torch
  forward pre-hooks: accelerate's CPU offload replaces a denoiser's ``forward`` after every pipeline call and
  restores the plain one on removal, which would drop any wrapper on ``forward``; torch's pre-hooks live apart
  from ``forward`` and survive it, in either order of ``enable_*_offload`` and ``tokred.apply``.
- **Site hooks** reduce tokens around a sub-module: torch forward pre- and post-hooks (:class:`ModuleSite`), or
  a processor installed on an attention module (see :mod:`tokred.adapters.attention`). Neither replaces a
  module's ``forward`` per instance, so ``compile_repeated_blocks(fullgraph=True)`` still compiles one graph per
  block class (a per-instance ``forward`` — what diffusers' ``HookRegistry`` installs — costs one graph per block).
- **The state hook** is a diffusers ``ModelHook`` kept in a ``HookRegistry`` on a container (a ``ModuleList``
  the model never calls). It is stateful like diffusers' cache hooks: ``reset_stateful_hooks()`` ends tokred's
  run, and the ``cache_context`` a pipeline names (``"cond"``, ``"uncond"``) reaches it as the CFG branch.

Everything is registered under names starting ``tokred.`` so that removal finds it all. No class is swapped and
no diffusers forward is copied.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from torch import Tensor

from tokred.engine import Engine, SiteSlot
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo

HOOK_PREFIX = "tokred."
RECORDS = "_tokred_hooks"  # module attribute: name -> the tokred hook registered there


@dataclass
class GridCell:
    """What the entry of a scope learned about the current call, for the sites inside it.

    Attributes:
        grid: the token grid of the merged stream; None when the call's tokens are no grid (nothing merges).
        extra: tokens of that stream after the grid that never merge (Flux Kontext's reference image).
        slots: the compiled-mode slots of the scope's sites (filled at the entry when the blocks are compiled).
        blocks: the modules whose compilation makes the scope's sites run compiled.
        prepared: whether the entry prepared the slots' plans for this call (the blocks run compiled).
    """

    grid: tuple[int, ...] | None = None
    extra: int = 0
    slots: list[SiteSlot] = field(default_factory=list)
    blocks: list[torch.nn.Module] = field(default_factory=list)
    prepared: bool = False

    @property
    def tokens(self) -> int:
        return math.prod(self.grid) if self.grid else 0


def argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def replace_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


def records(module: torch.nn.Module) -> dict[str, Any]:
    return module.__dict__.setdefault(RECORDS, {})


def _forget(module: torch.nn.Module, name: str) -> None:
    hooks = module.__dict__.get(RECORDS, {})
    hooks.pop(name, None)
    if not hooks:
        module.__dict__.pop(RECORDS, None)


def foreign_hooks(module: torch.nn.Module) -> bool:
    """Whether a diffusers hook other than tokred's is on ``module`` (a cache hook, say)."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and any(not name.startswith(HOOK_PREFIX) for name in registry.hooks)


def compiled(blocks: list[torch.nn.Module]) -> bool:
    """Whether any of ``blocks`` runs compiled (``module.compile()``, as ``compile_repeated_blocks`` does)."""
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)


# --- entry hooks ---------------------------------------------------------------------------------------------------


class EntryHook:
    """A torch forward pre-hook that reads a call's inputs (never changes them)."""

    role = "entry"
    first = False  # run before the module's other pre-hooks (the step must be known before plans are prepared)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.handle: Any = None

    @property
    def name(self) -> str:
        return HOOK_PREFIX + self.role

    def register(self, module: torch.nn.Module) -> None:
        if self.name in records(module):
            raise ValueError(f"{type(module).__name__} already has a {self.name} hook")
        self.handle = module.register_forward_pre_hook(self._call, with_kwargs=True, prepend=self.first)
        records(module)[self.name] = self

    def remove(self, module: torch.nn.Module) -> None:
        self.handle.remove()
        _forget(module, self.name)

    def in_place(self, module: torch.nn.Module) -> bool:
        return self.handle is not None and self.handle.id in module._forward_pre_hooks

    def _call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        _read(self, args, kwargs, torch.compiler.is_compiling())

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool) -> None:
        raise NotImplementedError


@torch.compiler.disable
def _read(hook: EntryHook, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool) -> None:
    """An entry hook's work, never traced: under a whole-model ``torch.compile`` it is the one graph break of
    each entry hook (its Python decisions and reads stay out of the graph)."""
    hook.read(args, kwargs, traced)


class StepHook(EntryHook):
    """On the denoiser: tells the engine that the model is called, with which timestep."""

    role = "step"
    first = True

    def __init__(self, engine: Engine, timestep_index: int = 1, timestep_name: str = "timestep") -> None:
        super().__init__(engine)
        self.timestep_index, self.timestep_name = timestep_index, timestep_name
        #: the pipeline's scheduler, when tokred was applied to a pipeline: its step count is read instead of
        #: the timestep tensor (no read back from the device)
        self.scheduler: Any = None
        #: (module, site) pairs whose site re-installs itself when the module's processor was replaced
        self.keepers: list[tuple[weakref.ref, Any]] = []

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool) -> None:
        for ref, site in self.keepers:
            module = ref()
            if module is not None:
                site.keep(module)
        self.engine.begin_model_call(
            argument(args, kwargs, self.timestep_index, self.timestep_name), scheduler_step(self.scheduler)
        )


def scheduler_step(scheduler: Any) -> int | None:
    """The step a diffusers scheduler is at (from its begin index), or None when it does not count steps."""
    if scheduler is None or not hasattr(scheduler, "step_index"):
        return None
    index = scheduler.step_index
    begin = getattr(scheduler, "begin_index", None) or 0
    return 0 if index is None else max(0, int(index) - int(begin))


#: reads (grid, extra tokens after the grid) from a scope call's (args, kwargs); None: no grid
GridReader = Callable[[tuple[Any, ...], dict[str, Any]], "tuple[int, ...] | tuple[tuple[int, ...], int] | None"]
#: reads the scope's image tokens (B, N, C) from a call, for plans built at the entry (compiled blocks)
FeatureReader = Callable[[tuple[Any, ...], dict[str, Any]], "Tensor | None"]


class GridHook(EntryHook):
    """On a scope: records the grid for its sites; when its blocks run compiled, builds their plans here.

    Sites inside compiled blocks cannot build plans (data-dependent work has no place in a full graph): they
    apply what this hook prepared from the scope's entry features (:meth:`Engine.prepare`).
    """

    role = "grid"

    def __init__(
        self, engine: Engine, cell: GridCell, read_grid: GridReader, read_features: FeatureReader | None = None
    ) -> None:
        super().__init__(engine)
        self.cell, self.read_grid, self.read_features = cell, read_grid, read_features

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool) -> None:
        read = self.read_grid(args, kwargs)
        if read is not None and isinstance(read[0], tuple):
            self.cell.grid, self.cell.extra = read  # type: ignore[assignment]
        else:
            self.cell.grid, self.cell.extra = read, 0  # type: ignore[assignment]
        self.cell.prepared = (traced or compiled(self.cell.blocks)) and self.read_features is not None
        if self.cell.prepared:
            features = self.read_features(args, kwargs)
            if features is not None and self.cell.extra:
                features = features[:, : features.shape[1] - self.cell.extra]
            self.engine.prepare(self.cell.slots, features, self.cell.grid)


# --- the state hook -------------------------------------------------------------------------------------------------


class _NoState:
    def reset(self) -> None:
        pass


class StateHook(ModelHook):
    """Keeps a patch in diffusers' state machinery: reset with the cache hooks, told the CFG branch.

    Registered in the ``HookRegistry`` of a container the model never calls (a ``ModuleList`` of blocks), so its
    forward wrapper never runs; ``reset_stateful_hooks()`` and ``cache_context(...)`` reach it all the same.
    """

    _is_stateful = True
    name = HOOK_PREFIX + "state"

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.branches = StateManager(_NoState)  # diffusers sets the pipeline's cache context on it
        engine.branch_source = self.branch

    def branch(self) -> str | None:
        """The name of the denoiser call the pipeline is making (its ``cache_context``), or None outside one."""
        try:
            return self.branches.context.name
        except ValueError:  # no context: a pipeline without cache contexts, or a bare model
            return None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.engine.new_run()
        return module

    def register(self, module: torch.nn.Module) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(self, self.name)
        records(module)[self.name] = self

    def in_place(self, module: torch.nn.Module) -> bool:
        registry = getattr(module, "_diffusers_hook", None)
        return registry is not None and registry.get_hook(self.name) is self

    def remove(self, module: torch.nn.Module) -> None:
        registry = module._diffusers_hook
        registry.remove_hook(self.name, recurse=False)
        if not registry.hooks:
            del module._diffusers_hook
            module.__dict__.pop("forward", None)  # the container's plain forward again
        _forget(module, self.name)


# --- sites ----------------------------------------------------------------------------------------------------------


class Site:
    """What every site shares: its engine, what the schedule knows of it, its scope's cell, and how it gets a plan."""

    role = "site"

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell) -> None:
        self.engine, self.site, self.cell = engine, site, cell
        self.slot = SiteSlot(site)
        cell.slots.append(self.slot)

    @property
    def name(self) -> str:
        return HOOK_PREFIX + self.role

    def plan(self, tokens: Tensor, *, share_batch: bool = False) -> MergePlan | None:
        """The plan for ``tokens`` (B, N, C) (the grid part of the stream) now, or None to run unchanged.

        Eager: built or reused by the engine from these very tokens. Compiled: the one the scope's entry prepared
        (only tensors are read here, so one graph serves every block of a class) — also in the parts of a compiled
        block that a graph break leaves eager (another hook, a cache's decision), so that one call merges with one
        plan and is counted once."""
        if torch.compiler.is_compiling():
            return None if share_batch else self.slot.plan
        if self.cell.prepared and not share_batch:
            return self.slot.plan
        return self.engine.plan_for(self.site, tokens, self.cell.grid, share_batch=share_batch)

    def split(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        """The grid tokens of a stream and the extra tokens after them (None when there are none)."""
        if not self.cell.extra:
            return hidden, None
        n = hidden.shape[1] - self.cell.extra
        return hidden[:, :n], hidden[:, n:]


class ModuleSite(Site):
    """A site around a module: torch forward pre- and post-hooks (``pre_forward`` / ``post_forward``)."""

    def register(self, module: torch.nn.Module) -> None:
        if self.name in records(module):
            raise ValueError(f"{type(module).__name__} already has a {self.name} hook")
        self.handles = (
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        )
        records(module)[self.name] = self

    def remove(self, module: torch.nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        _forget(module, self.name)

    def in_place(self, module: torch.nn.Module) -> bool:
        return self.handles[0].id in module._forward_pre_hooks

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.pre_forward(module, *args, **kwargs)

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self.post_forward(module, output)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output


class TokenSiteHook(ModuleSite):
    """On a sub-layer taking ``hidden_states`` (B, N, C) first and returning (B, N, C) (a feed-forward): it runs on
    the merged tokens and its output is unmerged; tokens after the grid pass as they are."""

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell, mode: str = "tokens") -> None:
        super().__init__(engine, site, cell)
        self.mode = mode
        self._pending: MergePlan | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self._pending = None
        hidden = argument(args, kwargs, 0, "hidden_states")
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            return args, kwargs
        grid_part, extra = self.split(hidden)
        plan = self.plan(grid_part)
        if plan is None:
            return args, kwargs
        merged = plan.merge(grid_part)
        if extra is not None:
            merged = torch.cat((merged, extra), dim=1)
        self._pending = plan
        return replace_argument(args, kwargs, 0, "hidden_states", merged)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        plan, self._pending = self._pending, None
        if plan is None:
            return output
        out = output[0] if isinstance(output, tuple) else output
        merged, extra = out[:, : plan.num_destinations], out[:, plan.num_destinations :]
        restored = plan.unmerge(merged)
        if extra.shape[1]:
            restored = torch.cat((restored, extra), dim=1)
        return (restored, *output[1:]) if isinstance(output, tuple) else restored


# --- finding and removing -------------------------------------------------------------------------------------------


def tokred_hooks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    """Every tokred hook on ``model`` or its sub-modules: (module, name, hook)."""
    found: list[tuple[torch.nn.Module, str, Any]] = []
    for module in model.modules():
        found += [(module, name, hook) for name, hook in module.__dict__.get(RECORDS, {}).items()]
    return found


def remove_hooks(model: torch.nn.Module, engine: Engine | None = None) -> int:
    """Remove tokred's hooks (only ``engine``'s when given); returns how many were removed."""
    removed = 0
    for module, _, hook in tokred_hooks(model):
        if engine is not None and getattr(hook, "engine", None) is not engine:
            continue
        hook.remove(module)
        removed += 1
    if removed:
        invalidate_registry_caches(model)
    return removed


def invalidate_registry_caches(model: torch.nn.Module) -> None:
    """diffusers caches which sub-modules hold hook registries (for cache contexts and state resets): after hooks
    are added or removed below ``model``, that list must be rebuilt."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
