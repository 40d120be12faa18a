from __future__ import annotations

import os

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)  # tiny models run 10-40x slower with two threads on these machines


@pytest.fixture
def make_pm():
    """A fresh plugin manager without entry points, holding the given test plugins."""
    from tokred.plugins import get_plugin_manager

    def make(*plugins, entry_points: bool = False, builtins: bool = False):
        pm = get_plugin_manager(entry_points=entry_points)
        if not builtins:
            for name in list(pm.sources):
                pm.unregister(name=name)
                del pm.sources[name]
        for index, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"test-plugin-{index}"
            pm.register_plugin(plugin, name, f"test {name}")
        pm.check_pending()
        return pm

    return make


@pytest.fixture
def make_registries(make_pm):
    from tokred.registry import Registries

    def make(*plugins, **kwargs):
        return Registries.from_plugin_manager(make_pm(*plugins, **kwargs))

    return make
