"""The Flux adapter on a tiny FluxPipeline / FluxTransformer2DModel built from configs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import tokred
from tokred.adapters.flux import gather_rope, grid_from_ids
from tokred.adapters.hooks import tokred_hooks
from tokred.errors import ConfigError
from tokred.jobs.testbed import TINY_FLUX_CONFIG, flux_transformer, tiny_flux_pipeline
from tokred.plan import build_plan
from tokred.strategies.base import select_by_priority
from tokred.strategies.localities import TileLocality
from tokred.strategies.merge_ops import PruneMerge

PRESETS = ("toma", "toma_stripe", "random", "grid", "todo", "tomesd_like")


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(text_encoders=True)


def generate(pipe, prompt="a squirrel", steps=2, height=256, width=256, text_len=77, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt=prompt,
        max_sequence_length=text_len,
        num_inference_steps=steps,
        height=height,
        width=width,
        output_type="np",
        generator=generator,
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def baseline(pipe):
    tokred.remove(pipe)
    return generate(pipe)


def transformer_inputs(model, batch=2, h=6, w=10, text=9, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return {
        "hidden_states": torch.randn(batch, h * w, cfg.in_channels, generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=gen).to(dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen).to(dtype),
        "timestep": torch.full((batch,), 0.5).to(dtype),
        "img_ids": ids.reshape(h * w, 3).to(dtype),
        "txt_ids": torch.zeros(text, 3).to(dtype),
        "guidance": torch.full((batch,), 3.5).to(dtype),
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_end_to_end_with_finite_different_output(pipe, baseline, preset):
    with tokred.patched(pipe, preset) as patch:
        images = generate(pipe)
        total = patch.stats.total
    assert np.isfinite(images).all() and not np.array_equal(images, baseline)
    assert total.merged_calls > 0 and total.tokens_out < total.tokens_in
    assert not tokred_hooks(pipe.transformer)


def test_toma_flux_preset_follows_the_reference_block_ranges(pipe, baseline):
    with tokred.patched(pipe, "toma_flux") as patch:
        assert np.array_equal(generate(pipe), baseline)  # the tiny model has no block 5: nothing merges
        assert patch.stats.total.merged_calls == 0
    blocks = {"double": "1-18", "single": "1-37"}
    with tokred.patched(pipe, "toma_flux", schedule={"name": "interval", "blocks": blocks}) as patch:
        images = generate(pipe)
        merged = {name for name, s in patch.stats.sites.items() if s.merged_calls}
        builds = patch.stats.total.plan_builds
    assert not np.array_equal(images, baseline)
    assert merged == {"transformer_blocks.1.attn", "single_transformer_blocks.1", "single_transformer_blocks.2"}
    assert builds == 2 * 2  # one per block kind and step: rebuilt at its first merging block, reused after
    config = tokred.load_config("toma_flux", overrides=["schedule.steps=0-/3"])
    schedule = tokred.Reduction.from_config(config, tokred.plugins.default_registries()).schedule
    from tokred.strategies.base import SiteInfo

    site = SiteInfo("single_transformer_blocks.7", "attn1", "single", 7)
    assert [schedule.merges(step, site) for step in range(7)] == [True, False, False, True, False, False, True]


def test_ratio_zero_and_removal_are_bit_identical(pipe, baseline):
    with tokred.patched(pipe, "toma", ratio=0.0):
        assert np.array_equal(generate(pipe), baseline)
    tokred.apply(pipe, "toma", sites=["attn1", "ff"])
    assert tokred.remove(pipe)
    assert np.array_equal(generate(pipe), baseline)
    tokred.apply(pipe, "toma", mode="kv")  # kv mode installs a processor: removal restores the original
    tokred.remove(pipe)
    assert np.array_equal(generate(pipe), baseline)
    assert all(type(b.attn.processor).__name__ == "FluxAttnProcessor" for b in pipe.transformer.transformer_blocks)


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_both_modes_non_square_text_lengths_and_batch(pipe, mode):
    with tokred.patched(pipe, "toma", mode=mode) as patch:
        wide = generate(pipe, height=256, width=384)
        grids = {plan.grid for plan in patch.engine.plans}
        long_text = generate(pipe, text_len=256)
        two = generate(pipe, prompt=["a squirrel", "a red house"])
    assert wide.shape == (1, 256, 384, 3) and grids == {(16, 24)}
    assert np.isfinite(wide).all() and np.isfinite(long_text).all()
    assert two.shape[0] == 2 and np.isfinite(two).all()


def test_double_block_feed_forward_site(pipe, baseline):
    with tokred.patched(pipe, "toma", sites=["attn1", "ff"]) as patch:
        images = generate(pipe)
    assert {s.name for s in patch.sites if s.kind == "ff"} == {"transformer_blocks.0.ff", "transformer_blocks.1.ff"}
    assert all(patch.stats.sites[s.name].merged_calls == 2 for s in patch.sites)
    assert not np.array_equal(images, baseline)


def test_true_cfg_counts_one_step_per_two_calls_and_each_branch_has_its_own_plans(pipe):
    with tokred.patched(pipe, "toma", schedule={"name": "interval", "every": 2}) as patch:
        generate(pipe, steps=3, negative_prompt="blurry", true_cfg_scale=2.0)
        assert patch.stats.model_calls == 6 and patch.stats.steps == 3
        # double and single, at steps 0 and 2, for the "cond" and the "uncond" call (diffusers' cache contexts):
        # the negative call never reuses a plan built from the positive call's features
        assert patch.stats.total.plan_builds == 2 * 2 * 2
        branches = {key[0] for key in patch.engine._plans}
    assert branches == {"cond", "uncond"}


def test_bad_sites_are_clear_errors(pipe):
    with pytest.raises(ConfigError, match="Flux has no attn2 site; its sites: attn1, ff"):
        tokred.apply(pipe, "toma", sites=["attn1", "attn2"])
    with pytest.raises(ConfigError, match=r"ff cannot run in mode kv on Flux.*sites that can: attn1"):
        tokred.apply(pipe, "toma", mode="kv", sites=["attn1", "ff"])
    assert not tokred_hooks(pipe.transformer)


def test_grid_comes_from_img_ids():
    ids = torch.zeros(3, 5, 3)
    ids[..., 1] += torch.arange(3)[:, None]
    ids[..., 2] += torch.arange(5)[None, :]
    assert grid_from_ids(ids.view(15, 3)) == ((3, 5), 0)
    shuffled = ids.view(15, 3).flip(0)
    assert grid_from_ids(shuffled) is None  # not row-major: nothing merges rather than a wrong grid
    assert grid_from_ids(ids.view(15, 3)[:14]) is None
    assert grid_from_ids(None) is None
    reference = torch.zeros(2, 4, 3)  # Kontext: a reference image's tokens follow, on a grid of their own
    reference[..., 0] = 1
    reference[..., 1] += torch.arange(2)[:, None]
    reference[..., 2] += torch.arange(4)[None, :]
    assert grid_from_ids(torch.cat((ids.view(15, 3), reference.view(8, 3)))) == ((3, 5), 8)
    assert grid_from_ids(torch.cat((reference.view(8, 3)[:2], ids.view(15, 3)))) is None


def test_gather_rope_keeps_text_and_picks_destinations():
    cos, sin = torch.arange(10.0).view(10, 1).repeat(1, 4), -torch.arange(10.0).view(10, 1).repeat(1, 4)
    g_cos, g_sin = gather_rope((cos, sin), 3, torch.tensor([[4, 0, 2]]))  # shared by the batch
    assert g_cos[:, 0].tolist() == [0, 1, 2, 7, 3, 5] and g_sin[:, 0].tolist() == [0, -1, -2, -7, -3, -5]
    per_sample, _ = gather_rope((cos, sin), 3, torch.tensor([[4, 0, 2], [1, 5, 6]]))  # each image its own
    assert per_sample[..., 0].tolist() == [[0, 1, 2, 7, 3, 5], [0, 1, 2, 4, 8, 9]]
    with_extra, _ = gather_rope((cos, sin), 3, torch.tensor([[4, 0]]), grid_tokens=5, extra=2)
    assert with_extra[:, 0].tolist() == [0, 1, 2, 7, 3, 8, 9]  # extra tokens keep their positions


class _Reversed:
    """Every slot, last first: with ratio 0 and no identity shortcut, merge permutes the tokens (tile order, then
    reversed within tiles) and unmerge puts them back, so RoPE must follow the destinations exactly."""

    def select(self, ctx):
        return select_by_priority(ctx, -torch.arange(ctx.layout.group_size).expand(ctx.layout.num_groups, -1))


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_rope_gather_with_an_identity_plan_reproduces_the_baseline(mode):
    model = flux_transformer(TINY_FLUX_CONFIG)
    inputs = transformer_inputs(model)
    with torch.no_grad():
        base = model(**inputs).sample
        patch = tokred.apply(model, "toma", mode=mode)

        def keep_everything(site, tokens, grid, share_batch=False):
            patch.engine.stats.site(site.name).merged_calls += 1
            return build_plan(
                tokens,
                grid,
                selector=_Reversed(),
                merge_op=PruneMerge(None),
                locality=TileLocality(TileLocality.Options(size=(4, 3))),
                ratio=0.0,
                identity_shortcut=False,
                share_batch=share_batch,
            )

        patch.engine.plan_for = keep_everything
        out = model(**inputs).sample
        patch.remove()
    assert all(s.merged_calls == 1 for s in patch.stats.sites.values()) and len(patch.stats.sites) == 5
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_transformer(dtype):
    model = flux_transformer(TINY_FLUX_CONFIG, dtype=dtype)
    inputs = transformer_inputs(model, dtype=dtype)
    with torch.no_grad():
        base = model(**inputs).sample
        for mode in ("tokens", "kv"):
            with tokred.patched(model, "toma", mode=mode):
                out = model(**inputs).sample
            assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base)


def test_no_warning_spam(pipe, caplog):
    with caplog.at_level(logging.WARNING), tokred.patched(pipe, "toma", mode="kv"):
        generate(pipe)
    assert not [r for r in caplog.records if "joint_attention_kwargs" in r.getMessage()]


def test_whole_model_compile_breaks_only_at_entry_hooks():
    import torch._dynamo as dynamo

    model = flux_transformer(TINY_FLUX_CONFIG)
    inputs = transformer_inputs(model)
    for mode in ("tokens", "kv"):
        with torch.no_grad(), tokred.patched(model, "toma", mode=mode) as patch:
            model(**inputs)
            merged = patch.stats.total.merged_calls
            dynamo.reset()
            explanation = dynamo.explain(model)(**inputs)
            assert patch.stats.total.merged_calls > merged  # the compiled call merged too
        dynamo.reset()
        stacks = [[f"{f.filename}:{f.name}" for f in r.user_stack] for r in explanation.break_reasons]
        for stack in stacks:  # only the entry hooks (timestep, img_ids) read values (none at all with torch 2.13)
            assert stack[-1].endswith("hooks.py:_call"), stack
            assert not any("plan.py" in f or "flux.py" in f or "attention.py" in f for f in stack), stack
