"""The SDXL/SD UNet adapter and the public apply/remove API, on tiny pipelines built from configs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import tokred
from tokred.adapters.hooks import tokred_hooks
from tokred.errors import ConfigError, TokredError
from tokred.jobs.testbed import TINY_SD1_UNET_CONFIG, TINY_SDXL_UNET_CONFIG, tiny_sdxl_pipeline, unet_from_config

PRESETS = ("toma", "toma_stripe", "random", "grid", "todo", "tomesd_like")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(text_encoders=True)


def generate(pipe, prompt="a squirrel", steps=2, height=256, width=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt=prompt, num_inference_steps=steps, height=height, width=width, output_type="np", generator=generator
    ).images


@pytest.fixture(scope="module")
def baseline(pipe):
    tokred.remove(pipe)
    return generate(pipe)


def unet_inputs(unet, batch=2, height=16, width=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(batch, config.in_channels, height, width, generator=gen).to(dtype)
    ehs = torch.randn(batch, 7, config.cross_attention_dim, generator=gen).to(dtype)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text, generator=gen).to(dtype),
            "time_ids": torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch).to(dtype),
        }
    return sample, torch.tensor(500), ehs, kwargs


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_end_to_end_with_finite_different_output(pipe, baseline, preset):
    with tokred.patched(pipe, preset) as patch:
        images = generate(pipe)
        total = patch.stats.total
    assert np.isfinite(images).all()
    assert not np.array_equal(images, baseline)
    assert total.merged_calls > 0 and total.tokens_out < total.tokens_in
    assert not tokred_hooks(pipe.unet)


def test_ratio_zero_and_removal_are_bit_identical(pipe, baseline):
    with tokred.patched(pipe, "toma", ratio=0.0) as patch:
        assert np.array_equal(generate(pipe), baseline)
        assert not patch.active and patch.sites == []
        # ratio 0 leaves the model untouched: no hook, no hook registry anywhere
        assert not any(hasattr(m, "_diffusers_hook") or m._forward_pre_hooks for m in pipe.unet.modules())
    tokred.apply(pipe, "toma", sites=["attn1", "attn2", "ff"])
    assert tokred.remove(pipe) is True
    assert np.array_equal(generate(pipe), baseline)
    assert "forward" not in pipe.unet.__dict__ and not hasattr(pipe.unet, "_diffusers_hook")
    assert tokred.remove(pipe) is False


def test_all_sites_in_tokens_mode(pipe, baseline):
    with tokred.patched(pipe, "toma", sites=["attn1", "attn2", "ff"]) as patch:
        images = generate(pipe)
    kinds = {site.kind for site in patch.sites}
    assert kinds == {"attn1", "attn2", "ff"}
    assert all(patch.stats.sites[site.name].merged_calls == 2 for site in patch.sites)
    assert np.isfinite(images).all() and not np.array_equal(images, baseline)


def test_kv_mode_only_reduces_self_attention(pipe):
    with pytest.raises(ConfigError, match=r"attn2 cannot run in mode kv on the UNet.*sites that can: attn1"):
        tokred.apply(pipe, "todo", sites=["attn1", "attn2"])
    assert not tokred_hooks(pipe.unet)


def test_non_square_size_uses_the_real_grid(pipe):
    with tokred.patched(pipe, "toma") as patch:
        images = generate(pipe, height=256, width=384)  # latents 32x48: attention at 16x24 and 8x12
        grids = {plan.grid for plan in patch.engine.plans}
    assert images.shape == (1, 256, 384, 3) and np.isfinite(images).all()
    assert grids == {(16, 24), (8, 12)}


def test_two_prompts_with_cfg(pipe):
    with tokred.patched(pipe, "toma") as patch:
        images = generate(pipe, prompt=["a squirrel", "a red house"])
        plan = patch.engine.plans[0]
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert plan.destinations.shape[0] == 4  # uncond + cond for each prompt: one batch, one step


def test_schedule_reuses_plans_and_new_call_restarts_steps(pipe):
    with tokred.patched(pipe, "toma", schedule={"name": "interval", "every": 2}) as patch:
        generate(pipe, steps=4)
        stats = patch.stats
        stages = 2
        sites = len(patch.sites)
        assert stats.steps == 4 and stats.model_calls == 4
        assert stats.total.plan_builds == stages * 2  # steps 0 and 2
        assert stats.total.plan_reuses == sites * 4 - stages * 2
        patch.reset()
        generate(pipe, steps=2)
        assert patch.stats.total.plan_builds == stages  # the new run starts at step 0 with fresh plans
        assert patch.engine.step == 1


def test_schedule_steps_and_blocks_limit_merging(pipe):
    schedule = {"name": "interval", "steps": "1-", "blocks": "0-1"}
    with tokred.patched(pipe, "toma", schedule=schedule) as patch:
        generate(pipe, steps=3)
    merged = {name: s.merged_calls for name, s in patch.stats.sites.items() if s.merged_calls}
    blocks = {site.name: site.block for site in patch.sites}
    assert merged and all(blocks[name] in (0, 1) for name in merged)
    assert all(count == 2 for count in merged.values())  # steps 1 and 2 only


def test_time_plans_records_build_time(pipe):
    patch = tokred.apply(pipe, "toma", time_plans=True)
    generate(pipe)
    patch.remove()
    assert patch.stats.total.build_seconds > 0
    assert patch.stats.as_dict()["total"]["plan_builds"] == patch.stats.total.plan_builds


def test_applying_again_replaces_and_never_stacks(pipe):
    first = tokred.apply(pipe, "toma")
    count = len(tokred_hooks(pipe.unet))
    second = tokred.apply(pipe, "grid", ratio=0.3)
    assert len(tokred_hooks(pipe.unet)) == count
    assert not first.active and second.active
    first.remove()  # a replaced patch's removal leaves the new one alone
    assert second.active
    second.remove()
    assert not tokred_hooks(pipe.unet)


def test_no_warning_spam(pipe, caplog):
    with caplog.at_level(logging.WARNING), tokred.patched(pipe, "toma", sites=["attn1", "attn2", "ff"]):
        generate(pipe)
    assert not [r for r in caplog.records if "cross_attention_kwargs" in r.getMessage()]
    assert not [r for r in caplog.records if r.name.startswith("tokred")]


def test_bare_sdxl_unet_and_half_precision():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, t, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(sample, t, ehs, **kwargs).sample
        with tokred.patched(unet, "toma") as patch:
            out = unet(sample, t, ehs, **kwargs).sample
        assert patch.adapter == "sdxl"
        assert torch.isfinite(out).all() and not torch.equal(out, base)
        assert torch.equal(unet(sample, t, ehs, **kwargs).sample, base)
        for dtype in (torch.bfloat16, torch.float16):
            half = unet_from_config(TINY_SDXL_UNET_CONFIG, dtype=dtype)
            s, t, e, kw = unet_inputs(half, dtype=dtype)
            try:
                reference = half(s, t, e, **kw).sample
            except RuntimeError as exc:  # some CPUs lack kernels for a dtype: then there is nothing to compare
                pytest.fail(f"{dtype} UNet does not run on this CPU: {exc}")
            with tokred.patched(half, "toma"):
                reduced = half(s, t, e, **kw).sample
            assert reduced.dtype == dtype and torch.isfinite(reduced).all()
            assert not torch.equal(reduced, reference)


def test_sd1_layout_unet():
    unet = unet_from_config(TINY_SD1_UNET_CONFIG)
    sample, t, ehs, _ = unet_inputs(unet, height=32, width=24)
    with torch.no_grad():
        base = unet(sample, t, ehs).sample
        with tokred.patched(unet, "toma") as patch:
            out = unet(sample, t, ehs).sample
            grids = {plan.grid for plan in patch.engine.plans}
    assert (32, 24) in grids  # SD 1.x attends at the full latent size
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_bare_transformer_2d_model():
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        num_layers=2,
        cross_attention_dim=12,
        norm_num_groups=8,
        use_linear_projection=True,
    ).eval()
    x = torch.randn(2, 16, 12, 10)
    ehs = torch.randn(2, 5, 12)
    with torch.no_grad():
        base = model(x, encoder_hidden_states=ehs).sample
        with tokred.patched(model, "toma", ratio=0.5) as patch:
            out = model(x, encoder_hidden_states=ehs).sample
    assert out.shape == base.shape and not torch.equal(out, base)
    assert patch.stats.total.tokens_in == 2 * 120 and patch.stats.total.tokens_out == 2 * 60


def test_unsupported_model_gets_a_clear_error():
    with pytest.raises(TokredError) as info:
        tokred.apply(torch.nn.Linear(3, 3))
    assert str(info.value).startswith("no tokred adapter handles Linear; available adapters: ")
    assert "sdxl" in str(info.value)
    with pytest.raises(TokredError, match="cannot patch a dict"):
        tokred.apply({"unet": 1})


def test_pipeline_component_is_found(pipe):
    patch = tokred.apply(pipe, "toma")
    try:
        assert patch.model is pipe.unet
        assert "active=True" in repr(patch)
    finally:
        patch.remove()


def test_whole_model_compile_breaks_only_at_entry_hooks():
    """dynamo's explain on the patched tiny UNet: every graph break is at an entry hook (the step counter at the
    UNet's entry, the plan preparation at each stage's entry), none inside a site (tomesd 0.1.3 breaks 29 times on
    this UNet)."""
    import torch._dynamo as dynamo

    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, t, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad(), tokred.patched(unet, "toma", sites=["attn1", "attn2", "ff"]) as patch:
        dynamo.reset()
        explanation = dynamo.explain(unet)(sample, t, ehs, **kwargs)
        assert patch.stats.total.merged_calls > 0 and explanation.graph_count >= 1
    dynamo.reset()
    where = [[f"{frame.filename}:{frame.name}" for frame in reason.user_stack] for reason in explanation.break_reasons]
    for stack in where:  # none at all with torch 2.13: entry hooks run their work outside the graph
        assert stack[-1].endswith("hooks.py:_call"), stack
        assert not any("attention.py" in frame or "sdxl.py" in frame or "plan.py" in frame for frame in stack)


def test_failed_apply_leaves_nothing_behind_and_keeps_the_earlier_patch(pipe):
    earlier = tokred.apply(pipe, "toma")
    count = len(tokred_hooks(pipe.unet))
    with pytest.raises(ConfigError):
        tokred.apply(pipe, "todo", sites=["attn1", "ff"])
    assert earlier.active and len(tokred_hooks(pipe.unet)) == count
    earlier.remove()


def test_one_step_runs_never_reuse_the_previous_image_plan(pipe):
    with tokred.patched(pipe, "toma") as patch:
        generate(pipe, steps=1, seed=0)
        generate(pipe, steps=1, seed=1)
        assert patch.stats.total.plan_builds == 2 * 2  # two stages, fresh in each run
    assert "set_timesteps" not in pipe.scheduler.__dict__  # the run watcher is gone with the patch


def test_plans_stay_float32_under_autocast():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, t, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad(), tokred.patched(unet, "toma") as patch, torch.autocast("cpu", dtype=torch.bfloat16):
        unet(sample, t, ehs, **kwargs)
        plans = patch.engine.plans
    assert plans and all(plan.merge_weights.dtype == torch.float32 for plan in plans)


def test_chunked_feed_forward_and_fused_qkv_run_unchanged_where_they_must():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, t, ehs, kwargs = unet_inputs(unet)
    from diffusers.models.attention import BasicTransformerBlock

    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            block.set_chunk_feed_forward(8, dim=1)  # chunks of 8 tokens: no grid here is that small
    with torch.no_grad(), tokred.patched(unet, "toma", sites=["attn1", "ff"]) as patch:
        out = unet(sample, t, ehs, **kwargs).sample
    ff = [s for name, s in patch.stats.sites.items() if name.endswith(".ff")]
    assert torch.isfinite(out).all() and ff and all(s.merged_calls == 0 for s in ff)  # chunks are not grids
    fused = unet_from_config(TINY_SDXL_UNET_CONFIG)
    fused.fuse_qkv_projections()
    with torch.no_grad(), tokred.patched(fused, "todo") as patch:
        out = fused(sample, t, ehs, **kwargs).sample
    assert torch.isfinite(out).all() and patch.stats.total.merged_calls == 0


def test_a_compiled_model_is_patched_through_its_original_module():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    compiled = torch.compile(unet)
    with tokred.patched(compiled, "toma") as patch:
        assert patch.model is unet


def test_proportional_attention_weighs_merged_keys_by_their_size():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, t, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(sample, t, ehs, **kwargs).sample
        outs = {}
        for proportional in (True, False):
            with tokred.patched(unet, "toma", proportional=proportional):
                outs[proportional] = unet(sample, t, ehs, **kwargs).sample
    assert not torch.equal(outs[True], outs[False])
    deviation = {k: float((v - base).norm() / base.norm()) for k, v in outs.items()}
    assert deviation[True] < deviation[False]


def test_generation_settings_given_to_apply_are_refused_by_name(pipe):
    with pytest.raises(ConfigError) as info:
        tokred.apply(pipe, "toma", steps=50)
    message = str(info.value)
    assert "steps: 'steps' is a generation setting" in message and "not a reduction setting" in message
    with pytest.raises(ConfigError, match="'prompt' is a generation setting"):
        tokred.apply(pipe, {"ratio": 0.3, "prompt": "a cat"})
    assert not tokred_hooks(pipe.unet)


def test_reset_stateful_hooks_resets_a_patch_like_diffusers_cache_hooks():
    """diffusers' own state machinery (``HookRegistry.reset_stateful_hooks``, run by pipelines at the end of each
    call) ends tokred's run: the next call is step 0 again, with plans built afresh."""
    from diffusers.hooks import HookRegistry

    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, _, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad(), tokred.patched(unet, "toma", schedule={"name": "interval", "every": 10}) as patch:
        for t in (900, 800, 700):
            unet(sample, torch.tensor(t), ehs, **kwargs)
        assert patch.engine.step == 2 and patch.stats.total.plan_builds == 2  # two stages, built at step 0
        stateful = [hook for _, _, hook in tokred_hooks(unet) if getattr(hook, "_is_stateful", False)]
        registries = [m._diffusers_hook for m in unet.modules() if hasattr(m, "_diffusers_hook")]
        assert len(stateful) == 1 and [list(r.hooks.values()) for r in registries] == [stateful]
        HookRegistry.check_if_exists_or_initialize(unet).reset_stateful_hooks()
        unet(sample, torch.tensor(600), ehs, **kwargs)  # a smaller timestep would be step 3 without the reset
        assert patch.engine.step == 0 and patch.stats.total.plan_builds == 4
