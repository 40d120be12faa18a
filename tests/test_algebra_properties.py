"""Property tests of the token-reduction algebra (hypothesis)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_tokens import (
    MERGES,
    grids,
    localities,
    ratios,
    seeds,
    selectors,
    smooth_tokens,
    tiles,
    token_tensors,
    video_grids,
)

from tokred import make_plan
from tokred.plugins import default_registries
from tokred.strategies.base import GroupLayout, as_frames, destination_counts
from tokred.strategies.facility_location import (
    facility_location_objective,
    greedy_facility_location,
    nonnegative_similarity,
    stochastic_greedy_facility_location,
)
from tokred.strategies.localities import stripes_of, tiles_of

REG = default_registries()


def plan_for(x, grid, *, selector, merge="attention", locality=None, ratio=0.5, **extra):
    config = {
        "ratio": ratio,
        "selector": selector,
        "merge": merge if isinstance(merge, dict) else {"name": merge},
        "locality": locality or {"name": "global"},
    }
    return make_plan(x, grid, config, registries=REG, **extra)


@st.composite
def setups(draw):
    grid = draw(grids)
    return {
        "grid": grid,
        "x": draw(token_tensors(grid)),
        "selector": draw(selectors()),
        "merge": draw(st.sampled_from(MERGES)),
        "locality": draw(localities()),
        "ratio": draw(ratios),
    }


@given(setups())
def test_rows_of_merge_and_unmerge_maps_sum_to_one(s):
    plan = plan_for(
        s["x"], s["grid"], selector=s["selector"], merge=s["merge"], locality=s["locality"], ratio=s["ratio"]
    )
    merge_map, unmerge_map = plan.merge_map(), plan.unmerge_map()
    assert merge_map.shape == (s["x"].shape[0], plan.num_destinations, plan.num_tokens)
    torch.testing.assert_close(merge_map.sum(-1), torch.ones(merge_map.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerge_map.sum(-1), torch.ones(unmerge_map.shape[:-1]), atol=1e-5, rtol=0)
    assert (merge_map >= 0).all() and (unmerge_map >= 0).all()


@given(setups())
def test_destinations_unique_in_range_and_inside_their_group(s):
    plan = plan_for(
        s["x"], s["grid"], selector=s["selector"], merge=s["merge"], locality=s["locality"], ratio=s["ratio"]
    )
    n = plan.num_tokens
    layout = REG.build("locality", s["locality"]).partition(s["grid"])
    expected = int(destination_counts(layout.counts, s["ratio"]).sum())
    assert plan.num_destinations == expected
    group_of = torch.empty(n, dtype=torch.long)
    group_of[layout.index[layout.valid]] = torch.arange(layout.num_groups).repeat_interleave(layout.counts)
    kept = destination_counts(layout.counts, s["ratio"])
    for row in plan.destinations:
        assert row.min() >= 0 and row.max() < n
        assert row.unique().numel() == row.numel()
        assert torch.equal(torch.bincount(group_of[row], minlength=layout.num_groups), kept)


@given(setups())
def test_merge_map_only_mixes_tokens_of_one_group(s):
    plan = plan_for(
        s["x"], s["grid"], selector=s["selector"], merge=s["merge"], locality=s["locality"], ratio=s["ratio"]
    )
    layout = REG.build("locality", s["locality"]).partition(s["grid"])
    group_of = torch.empty(plan.num_tokens, dtype=torch.long)
    group_of[layout.index[layout.valid]] = torch.arange(layout.num_groups).repeat_interleave(layout.counts)
    same = group_of[plan.destinations].unsqueeze(-1) == group_of.view(1, 1, -1)
    assert (plan.merge_map()[~same] == 0).all()


@given(grids, st.data())
def test_ratio_zero_is_the_identity_bit_for_bit(grid, data):
    x = data.draw(token_tensors(grid))
    plan = plan_for(x, grid, selector=data.draw(selectors()), locality=data.draw(localities()), ratio=0.0)
    assert plan.is_identity
    assert plan.merge(x) is x
    assert plan.unmerge(x) is x
    assert torch.equal(plan.destinations[0], torch.arange(plan.num_tokens))


@given(grids, tiles, st.integers(1, 6))
def test_partition_then_inverse_is_the_identity(grid, tile, count):
    n = math.prod(grid)
    x = torch.arange(n * 2, dtype=torch.float32).view(1, -1, 2)
    for layout in (tiles_of(grid, tile), stripes_of(grid, count, "rows"), stripes_of(grid, count, "frames")):
        slots = x.index_select(1, layout.index.flatten())
        assert torch.equal(slots.index_select(1, layout.inverse), x)
        covered = layout.index[layout.valid]
        assert torch.equal(covered.sort().values, torch.arange(n))  # each token once
        assert int(layout.counts.sum()) == n
        # the reshape path of exact tilings and the gather path agree
        slots4 = layout.to_slots(x)
        assert torch.equal(slots4.flatten(1, 2), slots)
        assert torch.equal(layout.from_slots(slots4), x)
    (f, h, w), (tf, th, tw) = as_frames(grid), as_frames(tile)
    if f % min(tf, f) == 0 and h % th == 0 and w % tw == 0:
        assert tiles_of(grid, tile).tile is not None


@given(grids, tiles)
def test_tiles_are_boxes_of_at_most_the_tile_size(grid, tile):
    layout = tiles_of(grid, tile)
    (f, _, _), (tf, th, tw) = as_frames(grid), as_frames(tile)
    for g in range(layout.num_groups):
        valid = layout.valid[g]
        coords = layout.coords[g][valid]
        frames = layout.frames[g][valid]
        rows, cols = coords[:, 0], coords[:, 1]
        extent = [int(t.max() - t.min() + 1) for t in (frames, rows, cols)]
        assert extent[0] <= min(tf, f) and extent[1] <= th and extent[2] <= tw
        assert math.prod(extent) == len(coords)  # a full box: no token of another tile inside


@given(video_grids, st.integers(1, 4))
def test_stripes_over_time_hold_whole_frames(grid, count):
    layout = stripes_of(grid, count, "frames")
    per_frame = grid[1] * grid[2]
    for g in range(layout.num_groups):
        frames = layout.frames[g][layout.valid[g]]
        assert int(layout.counts[g]) == per_frame * frames.unique().numel()
        assert int(frames.max() - frames.min() + 1) == frames.unique().numel()  # consecutive frames


@given(st.integers(1, 30), st.integers(1, 8), st.integers(1, 6), st.data())
def test_greedy_objective_rises_gains_fall(n, groups, count, data):
    count = min(count, n)
    seed = data.draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(1, groups, n, 5, generator=gen), dim=-1)
    valid = torch.ones(groups, n, dtype=torch.bool)
    s = (x @ x.transpose(-1, -2) + 1) / 2
    indices, gains = greedy_facility_location(s, valid, count)
    objectives = torch.stack([facility_location_objective(s, indices[..., : k + 1]) for k in range(count)], dim=-1)
    assert (objectives[..., 1:] >= objectives[..., :-1] - 1e-5).all()
    assert (gains[..., 1:] <= gains[..., :-1] + 1e-5).all()
    torch.testing.assert_close(objectives[..., -1], gains.sum(-1), atol=1e-4, rtol=1e-5)


@given(st.integers(2, 7), st.integers(1, 3), seeds)
def test_greedy_is_within_one_minus_one_over_e_of_brute_force(n, count, seed):
    count = min(count, n)
    x = torch.nn.functional.normalize(torch.randn(1, 1, n, 3, generator=torch.Generator().manual_seed(seed)), dim=-1)
    s = (x @ x.transpose(-1, -2) + 1) / 2
    indices, _ = greedy_facility_location(s, torch.ones(1, n, dtype=torch.bool), count)
    greedy = float(facility_location_objective(s, indices))
    best = max(
        float(facility_location_objective(s, torch.tensor(subset).view(1, 1, -1)))
        for subset in itertools.combinations(range(n), count)
    )
    assert greedy >= (1 - 1 / math.e) * best - 1e-5
    assert greedy <= best + 1e-5


@given(st.integers(1, 30), st.integers(1, 4), st.integers(1, 8), seeds, st.floats(0.01, 0.9))
def test_stochastic_greedy_picks_distinct_valid_slots(n, groups, count, seed, epsilon):
    count = min(count, n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(2, groups, n, 5, generator=gen), dim=-1)
    valid = torch.rand(groups, n, generator=gen) < 0.8
    valid[:, :count] = True  # at least count valid slots in every group
    s = nonnegative_similarity(x @ x.transpose(-1, -2), valid)
    indices, gains = stochastic_greedy_facility_location(s, valid, count, epsilon, gen)
    assert indices.shape == (2, groups, count)
    assert all(len(set(row.tolist())) == count for row in indices.flatten(0, 1))
    assert valid.unsqueeze(0).expand(2, -1, -1).gather(-1, indices).all()
    torch.testing.assert_close(facility_location_objective(s, indices), gains.sum(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("n", "count"), [(7, 2), (8, 3), (9, 2)])
def test_stochastic_greedy_is_within_one_minus_one_over_e_minus_epsilon_in_expectation(n, count):
    epsilon = 0.1
    for case in range(5):
        x = torch.nn.functional.normalize(
            torch.randn(1, 1, n, 3, generator=torch.Generator().manual_seed(case)), dim=-1
        )
        s = (x @ x.transpose(-1, -2) + 1) / 2
        best = max(
            float(facility_location_objective(s, torch.tensor(subset).view(1, 1, -1)))
            for subset in itertools.combinations(range(n), count)
        )
        draws = [
            float(
                facility_location_objective(
                    s,
                    stochastic_greedy_facility_location(
                        s, torch.ones(1, n, dtype=torch.bool), count, epsilon, torch.Generator().manual_seed(seed)
                    )[0],
                )
            )
            for seed in range(40)
        ]
        assert sum(draws) / len(draws) >= (1 - 1 / math.e - epsilon) * best - 1e-5


@given(grids, st.data())
def test_one_batch_element_never_affects_another(grid, data):
    x = data.draw(token_tensors(grid, batch=2))
    y = x.clone()
    y[1] = 1.0 - x[1].flip(0)  # another second element, same first element
    kw = {
        "selector": data.draw(selectors()),
        "merge": data.draw(st.sampled_from(MERGES)),
        "locality": data.draw(localities()),
        "ratio": data.draw(ratios),
    }
    a, b = plan_for(x, grid, **kw), plan_for(y, grid, **kw)
    assert torch.equal(a.destinations[0], b.destinations[0])
    torch.testing.assert_close(a.merge(x)[0], b.merge(y)[0])
    torch.testing.assert_close(a.unmerge(a.merge(x))[0], b.unmerge(b.merge(y))[0])


@given(grids, seeds, st.data())
def test_same_seed_same_plan(grid, seed, data):
    x = data.draw(token_tensors(grid))
    for selector in ({"name": "random", "seed": seed}, {"name": "grid", "random_offset": True, "seed": seed}):
        locality = data.draw(localities())
        first = plan_for(x, grid, selector=selector, locality=locality)
        again = plan_for(x, grid, selector=selector, locality=locality)
        assert torch.equal(first.destinations, again.destinations)
        assert torch.equal(first.merge_map(), again.merge_map())


def test_different_seeds_give_different_random_plans():
    x = smooth_tokens((16, 16), 1, 8, 0)
    plans = [plan_for(x, (16, 16), selector={"name": "random", "seed": seed}) for seed in range(3)]
    assert not torch.equal(plans[0].destinations, plans[1].destinations)
    assert not torch.equal(plans[1].destinations, plans[2].destinations)


@given(grids, ratios, st.data())
def test_mean_merge_after_unmerge_is_the_identity(grid, ratio, data):
    x = data.draw(token_tensors(grid))
    plan = plan_for(
        x, grid, selector=data.draw(selectors()), merge="mean", locality=data.draw(localities()), ratio=ratio
    )
    y = torch.randn(x.shape[0], plan.num_destinations, 3)
    torch.testing.assert_close(plan.merge(plan.unmerge(y)), y)


@given(grids, ratios, seeds, st.data())
def test_attention_at_very_high_temperature_is_hard(grid, ratio, seed, data):
    x = smooth_tokens(grid, 2, 16, seed)
    plan = plan_for(
        x,
        grid,
        selector=data.draw(selectors()),
        merge={"name": "attention", "temperature": 1e7},
        locality=data.draw(localities()),
        ratio=ratio,
    )
    product = plan.merge_map() @ plan.unmerge_map()
    eye = torch.eye(plan.num_destinations).expand_as(product)
    torch.testing.assert_close(product, eye, atol=1e-4, rtol=0)


@given(setups(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_inputs_give_finite_outputs_in_their_dtype(s, dtype):
    x = s["x"].to(dtype)
    plan = plan_for(x, s["grid"], selector=s["selector"], merge=s["merge"], locality=s["locality"], ratio=s["ratio"])
    merged = plan.merge(x)
    restored = plan.unmerge(merged)
    assert merged.dtype == dtype and restored.dtype == dtype
    assert torch.isfinite(merged).all() and torch.isfinite(restored).all()


@given(setups(), st.floats(-3, 3, width=32))
def test_constant_input_stays_constant(s, value):
    x = torch.full_like(s["x"], value)
    plan = plan_for(x, s["grid"], selector=s["selector"], merge=s["merge"], locality=s["locality"], ratio=s["ratio"])
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x, atol=1e-5, rtol=1e-5)


@given(st.integers(1, 40), ratios)
def test_destination_counts_round_and_stay_in_bounds(n, ratio):
    kept = int(destination_counts(torch.tensor([n]), ratio)[0])
    assert 1 <= kept <= n
    assert kept == max(1, min(n, round(n * (1 - ratio))))


def test_layout_rejects_missing_groups():
    with pytest.raises(ValueError, match="contiguous"):
        GroupLayout.from_group_ids((1, 3), torch.tensor([0, 2, 2]))


@given(setups())
def test_sizes_count_the_tokens_each_destination_stands_for(s):
    plan = plan_for(
        s["x"], s["grid"], selector=s["selector"], merge=s["merge"], locality=s["locality"], ratio=s["ratio"]
    )
    if plan.is_identity:
        assert plan.sizes is None
        return
    assert plan.sizes.shape == plan.destinations.shape and (plan.sizes >= 0).all()
    torch.testing.assert_close(plan.sizes.sum(-1), torch.full((plan.sizes.shape[0],), float(plan.num_tokens)))
    # a destination stands for at least its own token in hard merges
    if s["merge"] != "attention":
        assert (plan.sizes >= 1).all()
