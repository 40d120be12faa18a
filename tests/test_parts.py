"""Unit tests of the built-in parts (selectors, merge ops, localities, schedules), presets and the plan API."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis_tokens import smooth_tokens
from torch.utils._python_dispatch import TorchDispatchMode

import tokred
from tokred.config import list_presets, load_config
from tokred.errors import ConfigError
from tokred.plugins import default_registries
from tokred.reduction import resolve_reduction
from tokred.strategies.base import SiteInfo, destination_counts
from tokred.strategies.facility_location import facility_location_objective, nonnegative_similarity
from tokred.strategies.localities import stripe_layout, tile_layout
from tokred.strategies.schedules import IndexSet

REG = default_registries()
PRESETS = ("toma", "toma_stripe", "toma_sd3", "toma_wan", "random", "grid", "todo", "tomesd_like")


def smooth_field(grid, batch=2, channels=16, seed=0):
    """Structured tokens: a few low-frequency waves over the grid, as in smooth latents."""
    h, w = grid
    gen = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, h).view(h, 1)
    cols = torch.linspace(0, 1, w).view(1, w)
    out = torch.zeros(batch, h, w, channels)
    for _ in range(4):
        fr, fc = torch.rand(2, generator=gen) * 3
        phase = torch.rand(1, generator=gen) * 6.28
        amp = torch.randn(batch, 1, 1, channels, generator=gen)
        out += amp * torch.sin(6.28 * (fr * rows + fc * cols) + phase).unsqueeze(-1)
    return out.view(batch, h * w, channels)


def test_every_shipped_preset_validates_and_plans():
    assert set(PRESETS) <= set(list_presets())
    x = smooth_tokens((16, 12), 2, 8, 0)
    for name in list_presets():
        config = load_config(name, registries=REG)
        plan = tokred.make_plan(x, (16, 12), name, registries=REG)
        layout = REG.build("locality", config.locality).partition((16, 12))
        assert plan.num_destinations == int(destination_counts(layout.counts, config.ratio).sum())
        assert plan.unmerge(plan.merge(x)).shape == x.shape


def test_preset_contents():
    toma = load_config("toma", registries=REG)
    assert (toma.selector.name, toma.merge.name, toma.locality.name, toma.schedule.name) == (
        "toma",
        "attention",
        "tiles",
        "interval",
    )
    assert toma.locality.size == (8, 8) and toma.merge.temperature == 1000.0
    assert load_config("todo", registries=REG).mode == "kv"
    tomesd = load_config("tomesd_like", registries=REG)
    assert tomesd.selector.random_offset and tomesd.merge.name == "mean"
    assert load_config("toma_stripe", registries=REG).locality.name == "stripes"


def test_defaults_are_the_toma_parts_on_tiles():
    config = load_config(registries=REG)
    assert (config.selector.name, config.merge.name, config.locality.name, config.schedule.name) == (
        "toma",
        "attention",
        "tiles",  # global locality takes O(d·N²) per plan (38 s at 64x64 here): tiles are the default
        "interval",
    )
    assert config.locality.size == (8, 8) and config.proportional == "auto"
    assert tokred.ReductionConfig().proportional == "auto"
    assert load_config({"proportional": False}, registries=REG).proportional == "off"
    assert load_config({"proportional": True}, registries=REG).proportional == "auto"


def test_make_plan_shapes_and_overrides():
    x = torch.randn(2, 64 * 64, 32)
    plan = tokred.make_plan(x, (64, 64), "toma", ratio=0.75)
    assert plan.num_destinations == 64 * 16
    assert plan.merge(x).shape == (2, 1024, 32)
    assert plan.unmerge(plan.merge(x)).shape == x.shape
    assert plan.destinations.shape == (2, 1024) and plan.destinations.dtype == torch.long


def test_make_plan_errors_are_clear():
    x = torch.randn(1, 12, 4)
    with pytest.raises(ValueError, match="grid 3x3 has 9 tokens, but tokens has 12"):
        tokred.make_plan(x, (3, 3))
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        tokred.make_plan(x[0], (3, 4))
    with pytest.raises(ConfigError, match="ratio"):
        tokred.make_plan(x, (3, 4), ratio=1.0)
    plan = tokred.make_plan(x, (3, 4), ratio=0.5)
    with pytest.raises(ValueError, match=r"merge expects \(B, 12, C\)"):
        plan.merge(torch.randn(1, 11, 4))
    assert plan.merge(torch.randn(3, 12, 4)).shape[0] == 3  # a batch-1 plan serves any batch
    plan = tokred.make_plan(torch.randn(2, 12, 4), (3, 4), ratio=0.5)
    with pytest.raises(ValueError, match="built for batch 2, got batch 3"):
        plan.unmerge(torch.randn(3, plan.num_destinations, 4))


def test_plan_is_immutable():
    plan = tokred.make_plan(torch.randn(1, 16, 4), (4, 4), ratio=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.destinations = None  # type: ignore[misc]


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("locality", [{"name": "tiles", "size": [5, 3]}, {"name": "global"}])
def test_merge_and_unmerge_use_no_sort_argsort_or_scatter(preset, locality):
    x = smooth_tokens((10, 9), 2, 8, 1)
    plan = tokred.make_plan(x, (10, 9), preset, locality=locality)
    with _RecordOps() as recorder:
        plan.unmerge(plan.merge(x))
    banned = [op for op in recorder.ops if any(word in op for word in ("sort", "scatter", "index_put", "nonzero"))]
    assert recorder.ops and not banned, recorder.ops


def test_grid_at_ratio_three_quarters_keeps_one_token_per_cell():
    x = smooth_tokens((8, 8), 1, 4, 0)
    for offset in (False, True):
        plan = tokred.make_plan(
            x,
            (8, 8),
            "grid",
            locality={"name": "global"},
            ratio=0.75,
            selector={"name": "grid", "random_offset": offset, "seed": 3},
        )
        rows, cols = plan.destinations[0] // 8, plan.destinations[0] % 8
        cells = (rows // 2) * 4 + cols // 2
        assert torch.equal(cells.sort().values, torch.arange(16))
        if not offset:
            assert bool(((rows % 2 == 0) & (cols % 2 == 0)).all())


def test_grid_at_ratio_half_is_a_diagonal_pattern():
    plan = tokred.make_plan(smooth_tokens((4, 4), 1, 4, 0), (4, 4), "grid", locality={"name": "global"})
    rows, cols = plan.destinations[0] // 4, plan.destinations[0] % 4
    assert bool(((rows % 2) == (cols % 2)).all())  # phases (0,0) and (1,1) of each 2x2 cell


def test_stripes_are_bands_of_whole_rows():
    layout = stripe_layout(10, 7, 3)
    assert layout.num_groups == 3
    assert layout.counts.tolist() == [28, 21, 21] or sorted(layout.counts.tolist()) == [21, 21, 28]
    for g in range(3):
        rows = layout.coords[g][layout.valid[g]][:, 0]
        assert int(rows.numel()) == 7 * int(rows.unique().numel())
    assert stripe_layout(2, 5, 8).num_groups == 2  # never more bands than rows


def test_tiles_on_non_divisible_grids_have_smaller_edge_tiles():
    layout = tile_layout(10, 7, 4, 4)
    assert layout.num_groups == 3 * 2
    assert sorted(layout.counts.tolist()) == sorted([16, 12, 16, 12, 8, 6])


def test_toma_beats_random_and_grid_on_structured_input():
    x = smooth_field((32, 32), batch=2, channels=16, seed=0)
    scores = {}
    for selector in ("toma", "random", "grid"):
        config = {"selector": selector, "locality": {"name": "tiles", "size": [8, 8]}, "ratio": 0.75}
        plan = tokred.make_plan(x, (32, 32), config)
        layout = tile_layout(32, 32, 8, 8)
        feats = torch.nn.functional.normalize(x, dim=-1).index_select(1, layout.index.flatten()).view(2, 16, 64, -1)
        s = nonnegative_similarity(feats @ feats.transpose(-1, -2), layout.valid)
        slot_of_token = torch.empty(1024, dtype=torch.long)
        slot_of_token[layout.index.flatten()] = torch.arange(64).repeat(16)
        local = slot_of_token[plan.destinations].view(2, 16, -1)
        objective = float(facility_location_objective(s, local).sum())
        error = float((plan.unmerge(plan.merge(x)) - x).norm() / x.norm())
        scores[selector] = (objective, error)
    assert scores["toma"][0] > scores["random"][0] and scores["toma"][0] > scores["grid"][0]
    assert scores["toma"][1] < scores["random"][1] and scores["toma"][1] < scores["grid"][1]


def test_pinv_unmerge_inverts_the_merge_map():
    x = smooth_tokens((8, 8), 2, 16, 2)
    plan = tokred.make_plan(x, (8, 8), "toma", merge={"name": "attention", "temperature": 5.0, "unmerge": "pinv"})
    product = plan.merge_map() @ plan.unmerge_map()
    torch.testing.assert_close(product, torch.eye(plan.num_destinations).expand_as(product), atol=1e-4, rtol=0)


def test_low_temperature_is_soft():
    x = smooth_tokens((8, 8), 1, 16, 2)
    plan = tokred.make_plan(x, (8, 8), "toma", merge={"name": "attention", "temperature": 1.0})
    unmerge = plan.unmerge_map()
    assert float(unmerge.max()) < 0.5  # every source spreads over several destinations


def test_share_batch_picks_one_set_of_destinations():
    x = smooth_tokens((8, 8), 3, 16, 4)
    plan = tokred.make_plan(x, (8, 8), "toma", share_batch=True)
    assert torch.equal(plan.destinations[0], plan.destinations[1])
    assert torch.equal(plan.destinations[1], plan.destinations[2])
    merge_map = plan.merge_map()
    assert not torch.allclose(merge_map[0], merge_map[1])  # weights are still per sample


def test_example_plugin_selector_plans_through_its_entry_point():
    x = smooth_tokens((6, 6), 1, 4, 0)
    plan = tokred.make_plan(x, (6, 6), {"selector": {"name": "checkerboard", "phase": 0}, "ratio": 0.5})
    rows, cols = plan.destinations[0] // 6, plan.destinations[0] % 6
    assert bool(((rows + cols) % 2 == 0).all())
    assert default_registries()["selector"].get("checkerboard").source.startswith("tokred-example-plugin ")


def test_reduction_is_reused_when_given():
    reduction = resolve_reduction("toma")
    assert resolve_reduction(reduction) is reduction
    assert resolve_reduction(reduction, ratio=0.25).config.ratio == 0.25


# --- schedules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        (3, [3], [2, 4]),
        ("5-18", [5, 18], [4, 19]),
        ("0-/3", [0, 3, 30], [1, 2, 31]),
        ("2-8/3", [2, 5, 8], [3, 11]),
        ("10-", [10, 999], [9]),
        ([0, 2, "8-9"], [0, 2, 8, 9], [1, 10]),
        ("7", [7], [6]),
    ],
)
def test_index_sets(spec, inside, outside):
    indices = IndexSet(spec)
    assert all(i in indices for i in inside)
    assert not any(i in indices for i in outside)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("schedule.steps=a-b", "schedule.steps: not an index or range ('a-b', 'a-', 'a-b/step', 'a-/step')"),
        ("schedule.blocks=9-3", "not an index or range"),
        ("schedule.steps=0-/0", "not an index or range"),
        ("schedule.every=0", "schedule.every: Input should be greater than 0"),
        ("schedule.share=never", "schedule.share: Input should be 'stage' or 'site'"),
        ("locality.size=[0,4]", "locality.size.0: Input should be greater than 0"),
    ],
)
def test_bad_part_options_are_clear(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("toma", overrides=[override], registries=REG)
    assert fragment.replace("Value error, ", "") in str(info.value)


def test_interval_schedule_decisions():
    schedule = REG.build("schedule", {"name": "interval", "every": 3, "steps": "2-", "blocks": {"double": "5-18"}})
    site = SiteInfo("double.7", "attn1", "double", 7)
    assert not schedule.merges(1, site) and schedule.merges(2, site)
    assert not schedule.merges(2, SiteInfo("double.4", "attn1", "double", 4))
    assert not schedule.merges(2, SiteInfo("single.7", "attn1", "single", 7))  # family not listed
    assert schedule.rebuilds(2, None)
    assert not schedule.rebuilds(4, 2) and schedule.rebuilds(5, 2)
    assert schedule.rebuilds(0, 9)  # a new run starts over
    other = SiteInfo("double.8", "attn1", "double", 8)
    assert schedule.share_key(site, (64, 64)) == schedule.share_key(other, (64, 64))
    assert schedule.share_key(site, (64, 64)) != schedule.share_key(site, (32, 32))
    per_site = REG.build("schedule", {"name": "interval", "share": "site"})
    assert per_site.share_key(site, (8, 8)) != per_site.share_key(other, (8, 8))


def test_plain_reduction_config_and_options_on_default_parts():
    plan = tokred.make_plan(smooth_tokens((8, 8), 1, 4, 0), (8, 8), tokred.ReductionConfig(ratio=0.25))
    assert plan.num_destinations == 48
    config = load_config({"ratio": 0.3}, overrides=["merge.temperature=5"], registries=REG)
    assert (config.merge.name, config.merge.temperature) == ("attention", 5.0)
    with pytest.raises(ConfigError, match="each site at most once; repeated: attn1"):
        load_config("toma", overrides=["sites=[attn1,attn1]"], registries=REG)


def test_grid_random_offset_covers_every_cell_on_uneven_grids():
    x = smooth_tokens((5, 5), 1, 4, 0)
    for seed in range(20):
        plan = tokred.make_plan(
            x,
            (5, 5),
            {
                "selector": {"name": "grid", "random_offset": True, "seed": seed},
                "ratio": 1 - 9 / 25,
                "locality": "global",
            },
        )
        rows, cols = plan.destinations[0] // 5, plan.destinations[0] % 5
        assert plan.num_destinations == 9
        assert torch.equal(((rows // 2) * 3 + cols // 2).sort().values, torch.arange(9))


def test_salt_varies_random_draws_reproducibly():
    x = smooth_tokens((8, 8), 1, 4, 0)
    reduction = resolve_reduction("random")
    first, again, other = (reduction.plan(x, (8, 8), salt=s).destinations for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sizes_are_counted_when_a_merge_op_gives_none():
    from tokred.plan import build_plan
    from tokred.strategies.base import GroupMaps
    from tokred.strategies.localities import TileLocality
    from tokred.strategies.merge_ops import AttentionMerge, PruneMerge
    from tokred.strategies.selectors import FacilityLocationSelector

    class NoSizes:
        def __init__(self, inner):
            self.inner = inner

        def maps(self, ctx, destinations):
            maps = self.inner.maps(ctx, destinations)
            return GroupMaps(merge=maps.merge, unmerge=maps.unmerge, assignment=maps.assignment)

    x = smooth_tokens((6, 5), 2, 8, 0)
    for inner in (AttentionMerge(AttentionMerge.Options()), PruneMerge(None)):
        parts = {
            "selector": FacilityLocationSelector(None),
            "locality": TileLocality(TileLocality.Options(size=(4, 4))),
        }
        counted = build_plan(x, (6, 5), merge_op=NoSizes(inner), ratio=0.5, **parts)
        given = build_plan(x, (6, 5), merge_op=inner, ratio=0.5, **parts)
        torch.testing.assert_close(counted.sizes, given.sizes)


def test_toma_switches_to_stochastic_greedy_for_large_groups(monkeypatch):
    from tokred.strategies import selectors

    x = smooth_tokens((8, 8), 1, 4, 0)
    exact = tokred.make_plan(x, (8, 8), "toma", locality="global", selector={"name": "toma", "greedy": "exact"})
    monkeypatch.setattr(selectors, "EXACT_UP_TO", 16)  # so that a 64-token group counts as large
    auto = tokred.make_plan(x, (8, 8), "toma", locality="global")
    stochastic = tokred.make_plan(
        x, (8, 8), "toma", locality="global", selector={"name": "toma", "greedy": "stochastic"}
    )
    assert torch.equal(auto.destinations, stochastic.destinations)
    assert not torch.equal(auto.destinations, exact.destinations)
    assert auto.destinations.unique().numel() == auto.num_destinations == exact.num_destinations


def test_the_first_merge_of_the_tokens_a_plan_was_built_from_reuses_their_slots():
    x = smooth_tokens((16, 12), 2, 8, 0)
    plan = tokred.make_plan(x, (16, 12), "toma")
    assert plan._fresh  # the build's slot-ordered copy, kept for one merge
    first = plan.merge(x)
    assert not plan._fresh and torch.equal(first, plan.merge(x))  # the same as merging from scratch
    y = x.clone()
    plan = tokred.make_plan(y, (16, 12), "toma")
    y.mul_(2.0)  # changed in place after the build: its slots are gathered again
    torch.testing.assert_close(plan.merge(y), 2.0 * plan.merge(x))
