"""The plugin manager: built-in parts registered as plugins, then third-party entry points.

Third-party packages add parts with one line in their ``pyproject.toml``::

    [project.entry-points.tokred]
    myplugin = "tokred_myplugin"

``TOKRED_LOAD_PLUGINS`` (a comma-separated list of entry-point or distribution names) restricts which entry
points load; set it empty to load none.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import warnings

import pluggy

from tokred import hookspecs

ENTRY_POINT_GROUP = "tokred"
LOAD_PLUGINS_ENV = "TOKRED_LOAD_PLUGINS"

#: modules whose hook implementations provide tokred's own parts
DEFAULT_PLUGINS: tuple[str, ...] = ("tokred.strategies.builtin", "tokred.adapters.builtin")


class TokredPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from (``sources``)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        #: plugin name -> "built-in" or "<distribution> <version>"
        self.sources: dict[str, str] = {}

    def register_plugin(self, plugin: object, name: str, source: str) -> None:
        """Register ``plugin`` under ``name``, remembering its ``source``."""
        self.register(plugin, name=name)
        self.sources[name] = source


def _allowed_entry_points() -> set[str] | None:
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _load_entry_points(pm: TokredPluginManager) -> None:
    allowed = _allowed_entry_points()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else None
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            continue
        source = f"{dist_name} {dist.version}" if dist is not None else f"entry point {ep.value}"
        if pm.has_plugin(ep.name):
            warnings.warn(
                f"tokred plugin {ep.name!r} ({source}) is skipped: a plugin of that name is already loaded "
                f"({pm.sources.get(ep.name, 'unknown source')})",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        try:
            plugin = ep.load()
            pm.register_plugin(plugin, ep.name, source)
            pm.check_pending()
        except Exception as exc:  # a broken plugin must not take tokred down
            if pm.has_plugin(ep.name):
                pm.unregister(name=ep.name)
                pm.sources.pop(ep.name, None)
            warnings.warn(
                f"tokred plugin {ep.name!r} ({source}) could not be loaded and is skipped: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )


def get_plugin_manager(*, entry_points: bool = True) -> TokredPluginManager:
    """A new plugin manager: built-ins first, then the ``tokred`` entry points, then ``check_pending()``.

    Each call builds a fresh manager; :func:`default_plugin_manager` is the cached one the library uses.
    """
    pm = TokredPluginManager()
    for module_name in DEFAULT_PLUGINS:
        pm.register_plugin(importlib.import_module(module_name), module_name, "built-in")
    if entry_points:
        _load_entry_points(pm)
    pm.check_pending()
    return pm


@functools.lru_cache(maxsize=1)
def default_plugin_manager() -> TokredPluginManager:
    """The plugin manager of this process, built (and entry points loaded) once, on first use."""
    return get_plugin_manager()


@functools.lru_cache(maxsize=1)
def default_registries():  # type: ignore[no-untyped-def]
    """The registries of :func:`default_plugin_manager`."""
    from tokred.registry import Registries

    return Registries.from_plugin_manager(default_plugin_manager())
