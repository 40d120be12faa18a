"""The DiT families people run now — SD3/SD3.5, Flux.2, QwenImage, Wan video — on tiny models built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokred
from tokred.adapters.hooks import tokred_hooks
from tokred.jobs.testbed import (
    TINY_FLUX2_CONFIG,
    TINY_QWEN_IMAGE_CONFIG,
    TINY_SD3_CONFIG,
    TINY_WAN_CONFIG,
    flux2_transformer,
    qwen_image_transformer,
    sd3_transformer,
    tiny_flux2_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
    wan_transformer,
)
from tokred.plan import build_plan
from tokred.strategies.base import select_by_priority
from tokred.strategies.localities import TileLocality
from tokred.strategies.merge_ops import PruneMerge

FAMILIES = ("sd3", "flux2", "qwenimage", "wan")


def model_and_inputs(family, batch=2, grid=(6, 10), text=9, frames=3, dtype=torch.float32, seed=0):
    """A tiny model of the family and a call's keyword arguments for a ``grid`` of tokens (h, w)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    if family == "sd3":
        model = sd3_transformer(TINY_SD3_CONFIG, dtype=dtype)
        return model, {
            "hidden_states": rand(batch, 4, 2 * h, 2 * w),
            "encoder_hidden_states": rand(batch, text, 64),
            "pooled_projections": rand(batch, 64),
            "timestep": torch.full((batch,), 500.0).to(dtype),
        }
    if family == "flux2":
        model = flux2_transformer(TINY_FLUX2_CONFIG, dtype=dtype)
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
        return model, {
            "hidden_states": rand(batch, h * w, 16),
            "encoder_hidden_states": rand(batch, text, 24),
            "timestep": torch.full((batch,), 0.5).to(dtype),
            "img_ids": ids.unsqueeze(0).expand(batch, -1, -1),
            "txt_ids": txt.unsqueeze(0).expand(batch, -1, -1),
            "guidance": torch.full((batch,), 4.0).to(dtype),
        }
    if family == "qwenimage":
        model = qwen_image_transformer(TINY_QWEN_IMAGE_CONFIG, dtype=dtype)
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[-1, text - 3 :] = 0  # the last sample's text is padded
        return model, {
            "hidden_states": rand(batch, h * w, 16),
            "encoder_hidden_states": rand(batch, text, 24),
            "encoder_hidden_states_mask": mask,
            "timestep": torch.full((batch,), 0.5).to(dtype),
            "img_shapes": [[(1, h, w)]] * batch,
        }
    model = wan_transformer(TINY_WAN_CONFIG, dtype=dtype)
    return model, {
        "hidden_states": rand(batch, 4, frames, 2 * h, 2 * w),
        "timestep": torch.full((batch,), 500.0).to(dtype),
        "encoder_hidden_states": rand(batch, text, 16),
    }


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def sites_for(mode):
    return ["attn1", "ff"] if mode == "tokens" else ["attn1"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_ratio_zero_and_removal_are_bit_identical_and_merging_runs(family, mode):
    model, inputs = model_and_inputs(family)
    base = run(model, inputs)
    with tokred.patched(model, "toma", ratio=0.0) as patch:
        assert torch.equal(run(model, inputs), base) and not patch.active
    with tokred.patched(model, "toma", mode=mode, sites=sites_for(mode)) as patch:
        out = run(model, inputs)
        assert patch.adapter == family and patch.active
        total = patch.stats.total
        assert all(patch.stats.sites[site.name].merged_calls == 1 for site in patch.sites)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert total.tokens_out < total.tokens_in
    assert not tokred_hooks(model) and torch.equal(run(model, inputs), base)


class _Reversed:
    """Every slot, last first: with ratio 0 and no identity shortcut, merge permutes the tokens (tile order, then
    reversed within tiles) and unmerge puts them back, so positions (RoPE) must follow the destinations exactly."""

    def select(self, ctx):
        return select_by_priority(ctx, -torch.arange(ctx.layout.group_size).expand(ctx.layout.num_groups, -1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_a_permuting_plan_reproduces_the_baseline(family, mode):
    """Every path — projections, per-sample positions, text and image order, masks, the whole-block update — keeps
    each token's identity: a plan that only permutes tokens changes nothing."""
    model, inputs = model_and_inputs(family)
    base = run(model, inputs)
    extra = ["attn2"] if family == "wan" and mode == "tokens" else []
    patch = tokred.apply(model, "toma", mode=mode, sites=sites_for(mode) + extra)

    def permuting(site, tokens, grid, share_batch=False):
        patch.engine.stats.site(site.name).merged_calls += 1
        size = (1, 4, 3) if len(grid) == 3 else (4, 3)
        return build_plan(
            tokens,
            grid,
            selector=_Reversed(),
            merge_op=PruneMerge(None),
            locality=TileLocality(TileLocality.Options(size=size)),
            ratio=0.0,
            identity_shortcut=False,
            share_batch=share_batch,
        )

    patch.engine.plan_for = permuting
    out = run(model, inputs)
    patch.remove()
    assert all(stats.merged_calls == 1 for stats in patch.stats.sites.values())
    torch.testing.assert_close(out, base, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_does_not_depend_on_its_batch_mates(family):
    model, pair = model_and_inputs(family, seed=0)
    _, other = model_and_inputs(family, seed=1)
    mixed = dict(pair)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        if key in pair:
            mixed[key] = torch.cat((pair[key][:1], other[key][1:]))
    with torch.no_grad(), tokred.patched(model, "toma", sites=["attn1", "ff"]):
        a, b = run(model, pair)[0], run(model, mixed)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("grid", "text"), [((5, 7), 3), ((8, 4), 16)])
def test_odd_and_non_square_grids_and_text_lengths(family, grid, text):
    model, inputs = model_and_inputs(family, grid=grid, text=text)
    with tokred.patched(model, "toma", sites=["attn1", "ff"]) as patch:
        out = run(model, inputs)
        grids = {plan.grid for plan in patch.engine.plans}
    assert torch.isfinite(out).all() and patch.stats.total.merged_calls > 0
    assert grids == ({(3, *grid)} if family == "wan" else {grid})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(family, dtype):
    model, inputs = model_and_inputs(family, dtype=dtype)
    base = run(model, inputs)
    for mode in ("tokens", "kv"):
        with tokred.patched(model, "toma", mode=mode, sites=sites_for(mode)):
            out = run(model, inputs)
        assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_wan_video_grids_tiles_and_stripes_over_time(frames):
    model, inputs = model_and_inputs("wan", frames=frames, grid=(4, 6))
    base = run(model, inputs)
    localities = [{"name": "tiles", "size": [2, 2, 3]}, {"name": "stripes", "count": 2, "axis": "frames"}]
    for locality in localities:
        with tokred.patched(model, "toma", locality=locality, sites=["attn1", "attn2", "ff"]) as patch:
            out = run(model, inputs)
            (plan,) = patch.engine.plans
        assert plan.grid == (frames, 4, 6) and plan.num_destinations == frames * 24 // 2
        assert torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize(("family", "preset"), [("sd3", "toma_sd3"), ("wan", "toma_wan")])
def test_family_presets_merge_every_block_on_their_tiles(family, preset):
    model, inputs = model_and_inputs(family, batch=1, grid=(8, 8), frames=4)
    base = run(model, inputs)
    with tokred.patched(model, preset) as patch:
        out = run(model, inputs)
        blocks = {site.block for site in patch.sites}
        assert all(patch.stats.sites[site.name].merged_calls == 1 for site in patch.sites)
        (plan,) = patch.engine.plans
    grid = (8, 8) if family == "sd3" else (4, 8, 8)  # latent frames
    assert plan.grid == grid and len(blocks) == len(model.transformer_blocks if family == "sd3" else model.blocks)
    tiles = plan.layout.num_groups
    assert tiles == 4  # 8x8 in 4x4 tiles (SD3); 4x8x8 in 2x4x8 boxes (Wan)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_regional_compile(family):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, inputs = model_and_inputs(family)
    counter = CompileCounter()
    if model._repeated_blocks:
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
    else:  # SD3Transformer2DModel declares no repeated blocks in diffusers 0.42: compile its blocks the same way
        for block in model.transformer_blocks:
            block.compile(fullgraph=True, backend=counter)
    with torch.no_grad(), tokred.patched(model, "toma", schedule={"name": "interval", "every": 2}) as patch:
        outs = []
        for t in (0.9, 0.8, 0.7):
            step = {"timestep": inputs["timestep"] * 0 + (t if inputs["timestep"].max() <= 1 else 1000 * t)}
            outs.append(model(**{**inputs, **step}).sample)
        frames = counter.frame_count
        merged = patch.stats.total.merged_calls
        model(**inputs)
        assert counter.frame_count == frames  # compiled once: plan builds and reuses cause no recompile
    torch._dynamo.reset()
    assert merged > 0 and all(torch.isfinite(out).all() for out in outs)


# --- pipelines -------------------------------------------------------------------------------------------------------


def pipeline_call(family):
    gen = torch.Generator().manual_seed(1)
    if family == "sd3":
        pipe = tiny_sd3_pipeline()
        kwargs = {"prompt": "a red cube", "negative_prompt": "blurry", "max_sequence_length": 16}
        size = {"height": 64, "width": 96}
    elif family == "flux2":
        pipe = tiny_flux2_pipeline()
        kwargs = {"prompt_embeds": torch.randn(1, 7, 24, generator=gen), "guidance_scale": 4.0}
        size = {"height": 64, "width": 96}
    elif family == "qwenimage":
        pipe = tiny_qwen_image_pipeline()
        kwargs = {
            "prompt_embeds": torch.randn(1, 7, 24, generator=gen),
            "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 5, 24, generator=gen),
            "negative_prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long),
            "true_cfg_scale": 4.0,
        }
        size = {"height": 64, "width": 96}
    else:
        pipe = tiny_wan_pipeline()
        kwargs = {"prompt": "a red cube", "negative_prompt": "blurry", "max_sequence_length": 16, "num_frames": 9}
        size = {"height": 32, "width": 48}

    def call():
        out = pipe(
            **kwargs, **size, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
        )
        return out.frames if family == "wan" else out.images

    return pipe, call


@pytest.mark.parametrize("family", FAMILIES)
def test_pipelines(family):
    pipe, call = pipeline_call(family)
    base = call()
    with tokred.patched(pipe, "toma", ratio=0.0):
        assert np.array_equal(call(), base)
    for mode in ("tokens", "kv"):
        with tokred.patched(pipe, "toma", mode=mode, sites=sites_for(mode)) as patch:
            out = call()
            assert patch.stats.steps == 2 and patch.stats.total.merged_calls > 0
        assert np.isfinite(out).all() and not np.array_equal(out, base)
    assert np.array_equal(call(), base)
