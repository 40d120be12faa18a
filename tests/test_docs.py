"""Drift tests: the docs describe every hook with its exact signature."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tokred import hookspecs

REPO = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if inspect.isfunction(obj) and hasattr(obj, "tokred_spec"))


def test_hooks_exist():
    assert {"register_selectors", "resolve_adapter"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_documented_with_exact_signature(hook):
    text = (REPO / "docs" / "hooks.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"## {hook}\n" in text, f"docs/hooks.md has no section for {hook}"
    assert f"`{hook}({params})`" in text, f"docs/hooks.md does not show the signature {hook}({params})"


def test_firstresult_hooks_are_marked_in_the_docs():
    text = (REPO / "docs" / "hooks.md").read_text()
    for hook in HOOKS:
        if getattr(hookspecs, hook).tokred_spec.get("firstresult"):
            assert f"`{hook}(" in text and "firstresult" in text.split(f"## {hook}\n", 1)[1].split("##", 1)[0]
