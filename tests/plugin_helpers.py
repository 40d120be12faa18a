"""Small plugins that tests register on fresh plugin managers."""

from __future__ import annotations

import types

from pydantic import Field

import tokred
from tokred.registry import Options


class EveryOther:
    """Picks every other slot."""

    class Options(Options):
        start: int = Field(0, ge=0, le=1, description="first slot")

    def __init__(self, options):
        self.start = options.start


class Blend:
    """A test merge op."""

    class Options(Options):
        temperature: float = Field(100.0, gt=0)
        unmerge: str = "transpose"


def plugin(name: str, **hooks) -> types.SimpleNamespace:
    """A plugin object named ``name`` whose hooks are the given functions (wrapped as hookimpls)."""
    ns = types.SimpleNamespace(__name__=name)
    for hook_name, function in hooks.items():
        setattr(ns, hook_name, tokred.hookimpl(specname=hook_name)(function))
    return ns


def selectors_plugin(name: str = "selectors-a", *names: str):
    names = names or ("every_other",)

    def register_selectors(register):
        for part_name in names:
            register(part_name, EveryOther)

    return plugin(name, register_selectors=register_selectors)


def merge_plugin(name: str = "merges-a"):
    def register_merge_ops(register):
        register("blend", Blend, description="blends tokens")

    return plugin(name, register_merge_ops=register_merge_ops)
