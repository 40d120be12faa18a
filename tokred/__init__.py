"""tokred: run the transformer layers of diffusion models on fewer tokens, without training.

Importing tokred defines things and does nothing else: plugins load, and torch or diffusers are imported, on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokred.errors import ConfigError, TokredError, UnknownPartError
from tokred.hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tokred.api import Patch, apply, patched, remove
    from tokred.config import ReductionConfig, load_config
    from tokred.plan import MergePlan
    from tokred.plugins import get_plugin_manager
    from tokred.reduction import Reduction, make_plan
    from tokred.registry import Options, Registries

_LAZY = {
    "load_config": ("tokred.config", "load_config"),
    "ReductionConfig": ("tokred.config", "ReductionConfig"),
    "get_plugin_manager": ("tokred.plugins", "get_plugin_manager"),
    "Options": ("tokred.registry", "Options"),
    "Registries": ("tokred.registry", "Registries"),
    "make_plan": ("tokred.reduction", "make_plan"),
    "apply": ("tokred.api", "apply"),
    "remove": ("tokred.api", "remove"),
    "patched": ("tokred.api", "patched"),
    "Patch": ("tokred.api", "Patch"),
    "MergePlan": ("tokred.plan", "MergePlan"),
    "Reduction": ("tokred.reduction", "Reduction"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tokred' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "MergePlan",
    "Options",
    "Patch",
    "Reduction",
    "ReductionConfig",
    "Registries",
    "TokredError",
    "UnknownPartError",
    "__version__",
    "apply",
    "get_plugin_manager",
    "hookimpl",
    "load_config",
    "make_plan",
    "patched",
    "remove",
]
