"""The adapter contract and the shared attach: a model family is one file that declares its block patterns.

An adapter says which models it claims (:attr:`Adapter.model_types`), where the token grid of its blocks comes
from (:meth:`Adapter.scopes`, :meth:`Adapter.read_grid`), where the timestep is (:meth:`Adapter.timestep_arg`),
and, as data, which blocks hold which sites (:attr:`Adapter.patterns`). :meth:`Adapter.attach` does the rest
for every family alike: it checks the config against the declared sites and modes, registers one grid hook per
scope, one site hook per site and one step hook on the model, and numbers blocks per family in forward order.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokred.adapters.hooks import (
    FeatureReader,
    GridCell,
    GridHook,
    GridReader,
    StateHook,
    StepHook,
    remove_hooks,
    tokred_hooks,
)
from tokred.config import ReductionConfig
from tokred.engine import Engine
from tokred.errors import ConfigError, ConfigIssue
from tokred.registry import NoOptions, Options
from tokred.strategies.base import SiteInfo

Grid = tuple[int, ...]
#: builds the site hook of one site: (engine, site, the grid cell of its scope) -> an object with
#: ``register(module)`` and ``remove(module)`` (a :class:`~tokred.adapters.hooks.Site`)
HookFactory = Callable[[Engine, SiteInfo, GridCell], Any]


@dataclass(frozen=True)
class SiteRule:
    """One kind of site inside a block: which sub-module, and the hook that reduces it in each mode.

    Attributes:
        kind: the site kind a config names (``attn1``, ``attn2``, ``ff``).
        path: the sub-module's path inside the block (``"attn"``, ``"ff"``); ``""`` is the whole block.
        modes: mode (``tokens``, ``kv``) -> the factory of its hook; a mode left out is not supported here.
    """

    kind: str
    path: str
    modes: Mapping[str, HookFactory]


@dataclass(frozen=True)
class BlockPattern:
    """Blocks of one family and the sites inside each.

    Attributes:
        family: the block family a schedule names (``transformer``, ``double``, ``single``, ...).
        container: the attribute path, under a scope's module, of the ``ModuleList`` holding the blocks.
        types: the block classes handled; other blocks in the container are skipped (and not numbered).
        sites: the sites of each block.
    """

    family: str
    container: str
    types: tuple[type, ...]
    sites: tuple[SiteRule, ...]


@dataclass(frozen=True)
class Scope:
    """A module whose call carries the token grid of the blocks inside it (the model, or one stage of it).

    ``read_features`` gives the scope's image tokens (B, N, C) from the same call: when the blocks run compiled,
    plans are built from them at the scope's entry (sites inside a compiled block cannot build plans).
    """

    module: torch.nn.Module
    path: str
    read_grid: GridReader
    read_features: FeatureReader | None = None


@dataclass(frozen=True)
class FoundSite:
    """A site of one model: its module, what the schedule knows of it, how to hook it and its scope."""

    module: torch.nn.Module
    info: SiteInfo
    factory: HookFactory
    scope: Scope = field(repr=False)
    block: torch.nn.Module = field(repr=False)


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    if not path:
        return module
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


class Adapter:
    """Base of every adapter. Subclasses declare; the base checks, finds sites, attaches and detaches.

    Subclasses set :attr:`model_types` and :attr:`patterns`, and implement :meth:`read_grid` (or override
    :meth:`scopes` when the grid changes inside the model, as in a UNet's stages).
    """

    #: the adapter's options (a pydantic model with ``extra="forbid"``), set by an ``adapter`` config section
    Options: ClassVar[type[Options]] = NoOptions
    #: what the model family is called in messages
    label: ClassVar[str] = "this model"
    #: the model classes this adapter claims
    model_types: ClassVar[tuple[type, ...]] = ()
    #: the blocks of the model and their sites
    patterns: ClassVar[tuple[BlockPattern, ...]] = ()
    #: (position, keyword) of the timestep in the model's forward
    timestep: ClassVar[tuple[int, str]] = (1, "timestep")

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    # --- what a family declares ------------------------------------------------------------------------

    @classmethod
    def handles(cls, model: Any) -> bool:
        """Whether this adapter can patch ``model``."""
        return isinstance(model, cls.model_types)

    def scopes(self, model: torch.nn.Module) -> list[Scope]:
        """The modules whose calls carry the grid, in forward order (default: the model itself)."""
        return [Scope(model, "", self.read_grid, self.read_features)]

    def read_grid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Grid | None:
        """The token grid of a call of the scope's module, from its arguments (None: not a full grid)."""
        raise NotImplementedError(f"{type(self).__name__} must implement read_grid or scopes")

    def timestep_arg(self, model: torch.nn.Module) -> tuple[int, str]:
        """(position, keyword) of the timestep in ``model``'s forward."""
        return self.timestep

    # --- shared ---------------------------------------------------------------------------------------------

    def supported(self) -> dict[str, set[str]]:
        """Site kind -> the modes it runs in, as declared by the patterns."""
        found: dict[str, set[str]] = {}
        for pattern in self.patterns:
            for rule in pattern.sites:
                found.setdefault(rule.kind, set()).update(rule.modes)
        return found

    def check(self, config: ReductionConfig) -> None:
        """Refuse sites the family does not have and sites that cannot run in the config's mode."""
        supported = self.supported()
        here = ", ".join(sorted(supported))
        missing = [site for site in config.sites if site not in supported]
        if missing:
            raise ConfigError(
                [
                    ConfigIssue(
                        "sites",
                        f"{self.label} has no {' or '.join(missing)} site; its sites: {here}",
                        list(config.sites),
                        True,
                    )
                ]
            )
        wrong_mode = [site for site in config.sites if config.mode not in supported[site]]
        if wrong_mode:
            able = sorted(kind for kind, modes in supported.items() if config.mode in modes)
            raise ConfigError(
                [
                    ConfigIssue(
                        "sites",
                        f"{', '.join(wrong_mode)} cannot run in mode {config.mode} on {self.label} (kv mode reduces "
                        f"the keys and values of attention); sites that can: {', '.join(able) or 'none'}",
                        list(config.sites),
                        True,
                    )
                ]
            )

    def blocks(self, scope: Scope, pattern: BlockPattern) -> Iterator[tuple[str, torch.nn.Module]]:
        """(path in the model, block) for every block of ``pattern`` under ``scope``."""
        container = _submodule(scope.module, pattern.container)
        if container is None:
            return
        prefix = ".".join(part for part in (scope.path, pattern.container) if part)
        for index, block in enumerate(container):  # type: ignore[arg-type]
            if isinstance(block, pattern.types):
                yield f"{prefix}.{index}", block

    def sites(self, model: torch.nn.Module, config: ReductionConfig) -> list[FoundSite]:
        """Every site the config reduces, in forward order; blocks numbered per family."""
        found: list[FoundSite] = []
        counters: dict[str, int] = {}
        for scope in self.scopes(model):
            for pattern in self.patterns:
                for path, block in self.blocks(scope, pattern):
                    number = counters.get(pattern.family, 0)
                    counters[pattern.family] = number + 1
                    for rule in pattern.sites:
                        if rule.kind not in config.sites or config.mode not in rule.modes:
                            continue
                        module = _submodule(block, rule.path)
                        if module is None:
                            continue
                        name = f"{path}.{rule.path}" if rule.path else path
                        info = SiteInfo(name, rule.kind, pattern.family, number)
                        found.append(FoundSite(module, info, rule.modes[config.mode], scope, block))
        return found

    def read_features(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The scope's image tokens (B, N, C) from its call (default: none; compiled blocks then merge nothing)."""
        return None

    def state_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """A module of ``model`` that is never called (a container of blocks), to hold tokred's state hook."""
        for scope in self.scopes(model):
            for pattern in self.patterns:
                container = _submodule(scope.module, pattern.container)
                if isinstance(container, torch.nn.ModuleList):
                    return container
        raise TypeError(f"{type(model).__name__} has no block container to hold tokred's state hook")

    def attach(self, model: torch.nn.Module, engine: Engine, config: ReductionConfig) -> list[SiteInfo]:
        """Register the hooks of every site; returns the sites (empty: nothing to reduce, nothing registered)."""
        self.check(config)
        sites = self.sites(model, config)
        if not sites:
            return []
        cells: dict[int, GridCell] = {}
        for site in sites:
            key = id(site.scope.module)
            if key not in cells:
                cells[key] = GridCell()
                scope = site.scope
                GridHook(engine, cells[key], scope.read_grid, scope.read_features).register(scope.module)
            cell = cells[key]
            for module in (site.block, site.module):
                if all(module is not known for known in cell.blocks):
                    cell.blocks.append(module)
            site.factory(engine, site.info, cell).register(site.module)
        StateHook(engine).register(self.state_module(model))
        index, name = self.timestep_arg(model)
        step = StepHook(engine, timestep_index=index, timestep_name=name)
        step.register(model)
        step.keepers = [
            (weakref.ref(module), hook)
            for module, _, hook in tokred_hooks(model)
            if hook.engine is engine and callable(getattr(hook, "keep", None))
        ]
        return [site.info for site in sites]

    def detach(self, model: torch.nn.Module, engine: Engine | None = None) -> int:
        """Remove this engine's hooks (every tokred hook when ``engine`` is None); returns how many."""
        return remove_hooks(model, engine)
