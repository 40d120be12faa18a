from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
import warnings

import pluggy
import pytest
from plugin_helpers import merge_plugin, plugin, selectors_plugin

import tokred
from tokred.errors import DuplicatePartError, UnknownPartError
from tokred.plugins import get_plugin_manager
from tokred.registry import KINDS, Options, Registries


def test_parts_registered_with_options_description_and_source(make_registries):
    registries = make_registries(selectors_plugin("sel-plugin"), merge_plugin("merge-plugin"))
    part = registries["selector"].get("every_other")
    assert part.description == "Picks every other slot."  # first docstring line
    assert part.source == "test sel-plugin"
    assert part.plugin == "sel-plugin"
    assert part.options.model_fields["start"].default == 0
    blend = registries.part("merge_op", "blend")
    assert blend.description == "blends tokens"  # explicit description wins
    built = part.build({"start": 1})
    assert built.start == 1


def test_registries_are_independent_per_plugin_manager(make_registries):
    with_part = make_registries(selectors_plugin())
    without = make_registries()
    assert "every_other" in with_part["selector"]
    assert "every_other" not in without["selector"]


def test_duplicate_name_names_both_plugins(make_pm):
    pm = make_pm(selectors_plugin("first-plugin"), selectors_plugin("second-plugin"))
    with pytest.raises(DuplicatePartError) as info:
        Registries.from_plugin_manager(pm)
    message = str(info.value)
    assert "'every_other'" in message and "'first-plugin'" in message and "'second-plugin'" in message


def test_duplicate_name_within_one_plugin(make_pm):
    pm = make_pm(selectors_plugin("twice", "x", "x"))
    with pytest.raises(DuplicatePartError, match="'twice'"):
        Registries.from_plugin_manager(pm)


def test_same_name_in_different_kinds_is_fine(make_registries):
    def register_merge_ops(register):
        from plugin_helpers import Blend

        register("every_other", Blend)

    registries = make_registries(selectors_plugin(), plugin("m", register_merge_ops=register_merge_ops))
    assert "every_other" in registries["selector"] and "every_other" in registries["merge_op"]


def test_unknown_name_lists_available(make_registries):
    registries = make_registries(selectors_plugin("p", "alpha", "beta"))
    with pytest.raises(UnknownPartError) as info:
        registries["selector"].get("alpah")
    message = str(info.value)
    assert message == "unknown selector 'alpah' (did you mean 'alpha'?); available: alpha, beta"


def test_unknown_name_with_nothing_registered(make_registries):
    with pytest.raises(UnknownPartError, match="none"):
        make_registries()["locality"].get("tiles")


def test_misspelt_hook_fails_loudly():
    pm = get_plugin_manager(entry_points=False)

    def register_selector(register):  # singular: not a hook of tokred
        pass

    pm.register_plugin(plugin("typo", register_selector=register_selector), "typo", "test")
    with pytest.raises(pluggy.PluginValidationError, match="register_selector"):
        pm.check_pending()


def test_hook_with_wrong_argument_fails_at_registration():
    pm = get_plugin_manager(entry_points=False)

    def register_selectors(registrar):
        pass

    with pytest.raises(pluggy.PluginValidationError):
        pm.register_plugin(plugin("bad-args", register_selectors=register_selectors), "bad-args", "test")


def test_plugin_raising_in_register_warns_and_is_skipped(make_pm):
    def register_selectors(register):
        raise RuntimeError("boom")

    pm = make_pm(plugin("exploding", register_selectors=register_selectors), selectors_plugin("good"))
    with pytest.warns(RuntimeWarning, match=r"'exploding'.*boom"):
        registries = Registries.from_plugin_manager(pm)
    assert registries["selector"].names() == ["every_other"]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ("no-forbid", "extra='forbid'"),
        ("not-a-model", "pydantic model"),
        ("name-field", "field called 'name'"),
    ],
)
def test_bad_part_registration_warns_and_is_skipped(make_pm, options, reason):
    from pydantic import BaseModel

    class Loose(BaseModel):
        x: int = 0

    class Named(Options):
        name: str = "x"

    chosen = {"no-forbid": Loose, "not-a-model": dict, "name-field": Named}[options]

    def register_selectors(register):
        register("broken", lambda o: o, options=chosen)

    pm = make_pm(plugin("sloppy", register_selectors=register_selectors))
    with pytest.warns(RuntimeWarning, match=reason):
        registries = Registries.from_plugin_manager(pm)
    assert "broken" not in registries["selector"]


def test_every_kind_has_a_registry(make_registries):
    registries = make_registries()
    assert set(registries.by_kind) == set(KINDS)
    with pytest.raises(UnknownPartError, match="part kind"):
        registries["selectors"]


# --- entry points -------------------------------------------------------------------------------------------


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint: loading really imports the module."""

    group = "tokred"

    def __init__(self, name: str, value: str, dist: FakeDist) -> None:
        self.name, self.value, self.dist = name, value, dist

    def load(self):
        return importlib.import_module(self.value)


PLUGIN_MODULE = """
import tokred
from tokred.registry import Options

class {cls}:
    '''A selector from an entry point.'''
    def __init__(self, options):
        pass

@tokred.hookimpl
def register_selectors(register):
    register({part!r}, {cls})
"""


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Write plugin modules to a temp dir and expose them as ``tokred`` entry points."""
    monkeypatch.syspath_prepend(str(tmp_path))
    eps: list[FakeEntryPoint] = []

    def add(ep_name: str, dist_name: str, source: str) -> None:
        module = f"fake_tokred_plugin_{ep_name}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(module, None)
        eps.append(FakeEntryPoint(ep_name, module, FakeDist(dist_name, "1.2.3")))

    def entry_points(**kwargs):
        assert kwargs == {"group": "tokred"}
        return list(eps)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv("TOKRED_LOAD_PLUGINS", raising=False)
    return add


def test_entry_point_plugin_is_loaded_with_its_distribution(fake_entry_points):
    fake_entry_points("alpha", "tokred-alpha", PLUGIN_MODULE.format(cls="A", part="alpha_sel"))
    registries = Registries.from_plugin_manager(get_plugin_manager())
    part = registries["selector"].get("alpha_sel")
    assert part.source == "tokred-alpha 1.2.3"
    assert part.description == "A selector from an entry point."


def test_entry_point_failing_on_import_warns_and_others_load(fake_entry_points):
    fake_entry_points("broken", "tokred-broken", "raise ImportError('missing dependency xyz')\n")
    fake_entry_points("alpha", "tokred-alpha", PLUGIN_MODULE.format(cls="A", part="alpha_sel"))
    with pytest.warns(RuntimeWarning, match=r"'broken' \(tokred-broken 1.2.3\).*missing dependency xyz"):
        pm = get_plugin_manager()
    assert not pm.has_plugin("broken")
    assert "alpha_sel" in Registries.from_plugin_manager(pm)["selector"]


def test_entry_point_with_misspelt_hook_warns_and_is_skipped(fake_entry_points):
    source = "import tokred\n@tokred.hookimpl\ndef register_selectorz(register):\n    pass\n"
    fake_entry_points("typo", "tokred-typo", source)
    with pytest.warns(RuntimeWarning, match=r"'typo'.*register_selectorz"):
        pm = get_plugin_manager()
    assert not pm.has_plugin("typo")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, {"alpha_sel", "beta_sel"}),
        ("alpha", {"alpha_sel"}),
        ("tokred-beta", {"beta_sel"}),  # a distribution name works too
        (" alpha , beta ", {"alpha_sel", "beta_sel"}),
        ("", set()),
    ],
)
def test_tokred_load_plugins_restricts_entry_points(fake_entry_points, monkeypatch, env, expected):
    fake_entry_points("alpha", "tokred-alpha", PLUGIN_MODULE.format(cls="A", part="alpha_sel"))
    fake_entry_points("beta", "tokred-beta", PLUGIN_MODULE.format(cls="B", part="beta_sel"))
    if env is not None:
        monkeypatch.setenv("TOKRED_LOAD_PLUGINS", env)
    registries = Registries.from_plugin_manager(get_plugin_manager())
    builtin = {part.name for part in registries["selector"] if part.source == "built-in"}
    assert builtin == {"toma", "random", "grid"}  # built-ins load whatever the variable says
    assert set(registries["selector"].names()) - builtin == expected


def test_installed_example_plugin_is_found_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("TOKRED_LOAD_PLUGINS", raising=False)
    registries = Registries.from_plugin_manager(get_plugin_manager())
    part = registries["selector"].get("checkerboard")
    version = importlib.metadata.version("tokred-example-plugin")
    assert part.source == f"tokred-example-plugin {version}"


def test_import_tokred_loads_no_plugins_and_no_models():
    code = (
        "import sys, tokred\n"
        "assert tokred.hookimpl is not None\n"
        "loaded = [m for m in ('tokred.plugins', 'tokred_example_plugin', 'diffusers', 'torch') if m in sys.modules]\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_plugin_manager_is_built_once():
    from tokred.plugins import default_plugin_manager

    assert default_plugin_manager() is default_plugin_manager()


def test_warnings_do_not_leak_from_healthy_plugins(make_pm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Registries.from_plugin_manager(make_pm(selectors_plugin(), merge_plugin()))
    assert tokred.hookimpl.project_name == "tokred"
