"""Registries of parts, built from a plugin manager.

A registry is never a module global: :meth:`Registries.from_plugin_manager` asks every plugin of one manager
to register its parts, so two managers (one per test, say) never see each other's parts.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ConfigDict

from tokred.errors import DuplicatePartError, PluginError, UnknownPartError


class Options(BaseModel):
    """Base class of a part's options: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(Options):
    """A part that takes no options."""


#: kind -> name of the hook that registers parts of that kind
KIND_HOOKS: dict[str, str] = {
    "selector": "register_selectors",
    "merge_op": "register_merge_ops",
    "locality": "register_localities",
    "schedule": "register_schedules",
    "adapter": "register_adapters",
}
KINDS: tuple[str, ...] = tuple(KIND_HOOKS)

BUILTIN_SOURCE = "built-in"


@dataclass(frozen=True)
class Part:
    """One registered part: what builds it, what options it takes, where it came from."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    options: type[BaseModel]
    description: str
    plugin: str
    source: str

    def build(self, options: BaseModel | Mapping[str, Any] | None = None) -> Any:
        """Build the part from validated options (a model instance) or a mapping of option values."""
        if options is None or isinstance(options, Mapping):
            options = self.options.model_validate(dict(options or {}))
        return self.factory(options)


def _first_doc_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """The parts of one kind, by name."""

    def __init__(self, kind: str, parts: Mapping[str, Part]) -> None:
        self.kind = kind
        self._parts = dict(sorted(parts.items()))

    def get(self, name: str) -> Part:
        """The part called ``name``; an :class:`UnknownPartError` listing the available names otherwise."""
        try:
            return self._parts[name]
        except KeyError:
            raise UnknownPartError(self.kind, name, list(self._parts)) from None

    def names(self) -> list[str]:
        return list(self._parts)

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[Part]:
        return iter(self._parts.values())

    def __len__(self) -> int:
        return len(self._parts)


@dataclass
class Registries:
    """Every kind's registry, built from one plugin manager."""

    by_kind: dict[str, Registry]
    plugin_manager: pluggy.PluginManager | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getitem__(self, kind: str) -> Registry:
        try:
            return self.by_kind[kind]
        except KeyError:
            raise UnknownPartError("part kind", kind, list(self.by_kind)) from None

    def part(self, kind: str, name: str) -> Part:
        return self[kind].get(name)

    def build(self, kind: str, spec: BaseModel | Mapping[str, Any]) -> Any:
        """Build a part from a config section such as ``{name: toma, ...options}`` or its validated model."""
        if isinstance(spec, BaseModel):
            return self.part(kind, spec.name).build(spec)  # type: ignore[attr-defined]
        options = dict(spec)
        return self.part(kind, options.pop("name")).build(options)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registries:
        """Ask every plugin of ``pm`` to register its parts.

        A plugin whose hook raises is reported with a warning naming it and its parts of that kind are
        skipped. Two plugins registering the same name raise :class:`DuplicatePartError` naming both.
        """
        sources: Mapping[str, str] = getattr(pm, "sources", {})
        by_kind: dict[str, Registry] = {}
        for kind, hook_name in KIND_HOOKS.items():
            parts: dict[str, Part] = {}
            for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order
                source = sources.get(impl.plugin_name, f"plugin {impl.plugin_name}")
                register = _Registrar(kind, impl.plugin_name, source, parts)
                try:
                    impl.function(register=register)
                except DuplicatePartError:
                    raise
                except Exception as exc:  # a broken plugin must not take tokred down
                    warnings.warn(
                        f"tokred plugin {impl.plugin_name!r} ({source}) failed in {hook_name}: "
                        f"{type(exc).__name__}: {exc}; its {kind} parts are skipped",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                parts.update(register.staged)
            by_kind[kind] = Registry(kind, parts)
        return cls(by_kind=by_kind, plugin_manager=pm)


class _Registrar:
    """The ``register`` callback handed to one plugin's hook for one kind; parts land only if the hook returns."""

    def __init__(self, kind: str, plugin: str, source: str, existing: Mapping[str, Part]) -> None:
        self.kind, self.plugin, self.source, self.existing = kind, plugin, source, existing
        self.staged: dict[str, Part] = {}

    def __call__(
        self,
        name: str,
        factory: Callable[[Any], Any],
        *,
        options: type[BaseModel] | None = None,
        description: str | None = None,
    ) -> None:
        kind, plugin = self.kind, self.plugin
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"plugin {plugin!r}: {kind} name must be an identifier, got {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r}: the factory of {kind} {name!r} is not callable")
        options = options if options is not None else getattr(factory, "Options", NoOptions)
        if not (isinstance(options, type) and issubclass(options, BaseModel)):
            raise PluginError(f"plugin {plugin!r}: options of {kind} {name!r} must be a pydantic model class")
        if options.model_config.get("extra") != "forbid":
            raise PluginError(f"plugin {plugin!r}: options of {kind} {name!r} must set extra='forbid'")
        if "name" in options.model_fields:
            raise PluginError(f"plugin {plugin!r}: options of {kind} {name!r} may not have a field called 'name'")
        for other in (self.existing.get(name), self.staged.get(name)):
            if other is not None:
                raise DuplicatePartError(kind, name, other.plugin, plugin)
        text = description if description is not None else _first_doc_line(factory)
        self.staged[name] = Part(kind, name, factory, options, text, plugin, self.source)
