"""tokred stacked with step caching: diffusers' cache hooks and cache-dit, applied and removed in either order."""

from __future__ import annotations

import ast
import contextlib
import io
import logging

import pytest
import torch

import tokred
from tokred.adapters.hooks import tokred_hooks
from tokred.jobs.testbed import tiny_flux_pipeline

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def generate(pipe):
    return pipe(
        prompt="a squirrel",
        num_inference_steps=STEPS,
        height=128,
        width=128,
        max_sequence_length=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


class Computed:
    """Counts what really ran: a torch pre-hook on a sub-module each block or attention calls first."""

    def __init__(self, transformer):
        self.counts = {"attention": 0}
        self.handles = []
        for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
            self.handles.append(block.attn.to_q.register_forward_pre_hook(self._count))

    def _count(self, module, args):
        self.counts["attention"] += 1

    def reset(self):
        self.counts["attention"] = 0
        return self

    def remove(self):
        for handle in self.handles:
            handle.remove()


def mag_ratios(pipe):
    from diffusers import MagCacheConfig

    buffer = io.StringIO()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    with contextlib.redirect_stdout(buffer):
        generate(pipe)
    pipe.transformer.disable_cache()
    return ast.literal_eval(buffer.getvalue().strip().splitlines()[-1])


def cache_configs(pipe):
    from diffusers import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    return {
        "first_block": FirstBlockCacheConfig(threshold=0.8),
        "taylorseer": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32
        ),
        "magcache": MagCacheConfig(
            mag_ratios=mag_ratios(pipe), num_inference_steps=STEPS, threshold=1.0, retention_ratio=0.2, max_skip_steps=3
        ),
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
    }


@pytest.fixture(scope="module")
def configs(pipe):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    return cache_configs(pipe)


@pytest.mark.parametrize("cache", ["first_block", "taylorseer", "magcache", "pab"])
@pytest.mark.parametrize("removal", ["tokred_first", "cache_first"])
def test_diffusers_caches_and_tokred_stack_in_either_order(pipe, configs, cache, removal):
    transformer = pipe.transformer
    computed = Computed(transformer)
    try:
        base = generate(pipe)
        transformer.enable_cache(configs[cache])
        computed.reset()
        cached = generate(pipe)
        assert computed.counts["attention"] < 5 * STEPS  # the cache skipped something
        transformer.disable_cache()
        with tokred.patched(pipe, "toma") as alone:
            reduced = generate(pipe)
        outputs = {}
        for order in ("cache_then_tokred", "tokred_then_cache"):
            if order == "cache_then_tokred":
                transformer.enable_cache(configs[cache])
                patch = tokred.apply(pipe, "toma")
            else:
                patch = tokred.apply(pipe, "toma")
                transformer.enable_cache(configs[cache])
            computed.reset()
            outputs[order] = generate(pipe)
            ran = computed.counts["attention"]
            stats = patch.stats.total
            # tokred counts only the attention calls that ran: the cache's skipped blocks are not site calls
            assert stats.calls == ran < alone.stats.total.calls
            assert stats.merged_calls == ran
            if removal == "tokred_first":
                patch.remove()
                transformer.disable_cache()
            else:
                transformer.disable_cache()
                patch.remove()
            assert not tokred_hooks(transformer)
            assert torch.equal(generate(pipe), base)  # both removed: bit-identical to the plain model
        torch.testing.assert_close(outputs["cache_then_tokred"], outputs["tokred_then_cache"], rtol=0, atol=0)
        both = outputs["cache_then_tokred"]
        assert torch.isfinite(both).all()
        assert not torch.equal(both, cached) and not torch.equal(both, reduced)
    finally:
        computed.remove()


def test_plans_are_built_only_in_blocks_that_run(pipe, configs):
    """With FirstBlockCache skipping every block after the first on most steps, the single blocks' plan is built
    from the first single block's input on a step it runs, never from a skipped block."""
    transformer = pipe.transformer
    transformer.enable_cache(configs["first_block"])
    try:
        with tokred.patched(pipe, "toma", schedule={"name": "interval", "every": 1}) as patch:
            generate(pipe)
            single = patch.stats.sites["single_transformer_blocks.0"]
            double = patch.stats.sites["transformer_blocks.0.attn"]
            assert double.calls == STEPS  # the first block always runs
            assert single.plan_builds == single.calls < STEPS  # one plan per step it ran, none for skipped steps
    finally:
        transformer.disable_cache()


@pytest.fixture
def quiet_cache_dit():
    import cache_dit  # noqa: F401  (a test dependency: missing, this fails rather than skips)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


@pytest.mark.parametrize("order", ["cache_dit_then_tokred", "tokred_then_cache_dit"])
def test_cache_dit_dbcache_and_tokred(quiet_cache_dit, order):
    import cache_dit
    from cache_dit import DBCacheConfig

    pipe = tiny_flux_pipeline()
    computed = Computed(pipe.transformer)
    config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, residual_diff_threshold=10.0)
    base = generate(pipe)
    computed.reset()
    if order == "cache_dit_then_tokred":
        cache_dit.enable_cache(pipe, cache_config=config)
        patch = tokred.apply(pipe, "toma")
    else:
        patch = tokred.apply(pipe, "toma")
        cache_dit.enable_cache(pipe, cache_config=config)
    out = generate(pipe)
    ran = computed.counts["attention"]
    assert ran < 5 * STEPS  # DBCache skipped blocks
    assert patch.stats.total.calls == ran and patch.stats.total.merged_calls == ran > 0
    assert patch.stats.steps == STEPS  # tokred's step counter survives cache-dit's forward
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    cache_dit.disable_cache(pipe)
    patch.remove()
    assert torch.equal(generate(pipe), base)
    computed.remove()


# SD3's model takes no diffusers cache (no enable_cache in diffusers 0.42); FirstBlockCache fails on Flux.2 without
# tokred (its double blocks return a pair, its single blocks one tensor), so Flux.2 is tested with TaylorSeer
@pytest.mark.parametrize(("family", "cache"), [("qwenimage", "fbc"), ("wan", "fbc"), ("flux2", "taylorseer")])
@pytest.mark.parametrize("order", ["cache_then_tokred", "tokred_then_cache"])
def test_step_caches_and_tokred_on_the_dit_families(family, cache, order):
    """A step cache on the newer DiTs: tokred merges in what runs and counts nothing else. Inputs change little from
    step to step, so FirstBlockCache hits on every step after the first (only the head block runs there), and
    TaylorSeer computes every second step."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig
    from test_families import model_and_inputs

    model, inputs = model_and_inputs(family, batch=1)
    steps = 4
    timestep = inputs["timestep"]

    def denoise():
        outs = []
        with torch.no_grad():
            for k in range(steps):
                with model.cache_context("cond"):
                    outs.append(model(**{**inputs, "timestep": timestep * (1 - 0.01 * k)}).sample)
        model._reset_stateful_cache()
        return torch.stack(outs)

    config = (
        FirstBlockCacheConfig(threshold=0.5)
        if cache == "fbc"
        else TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)
    )
    base = denoise()
    if order == "cache_then_tokred":
        model.enable_cache(config)
        patch = tokred.apply(model, "toma")
    else:
        patch = tokred.apply(model, "toma")
        model.enable_cache(config)
    both = denoise()
    calls = [patch.stats.sites[site.name].calls for site in patch.sites]
    merged = [patch.stats.sites[site.name].merged_calls for site in patch.sites]
    if cache == "fbc":
        assert calls == [steps] + [1] * (len(calls) - 1)  # the head block every step, the others on the first
    else:
        assert calls == [steps // 2] * len(calls)  # attention computed every second step
    assert merged == calls
    assert torch.isfinite(both).all() and not torch.equal(both, base)
    patch.remove()
    model.disable_cache()
    assert not tokred_hooks(model) and torch.equal(denoise(), base)


@pytest.mark.parametrize("cache", ["first_block", "taylorseer"])
def test_everything_at_once_over_several_images(pipe, configs, cache):
    """The way users stack it: model offload, another attention backend, regional compile (fullgraph=False: the
    caches' decisions cannot be compiled), a cache hook and tokred, over several images in a row; removing both
    gives back the plain pipeline bit for bit."""
    from diffusers import attention_backend

    transformer = pipe.transformer
    base = generate(pipe)
    torch._dynamo.reset()
    pipe.enable_model_cpu_offload(device="cpu")
    transformer.enable_cache(configs[cache])
    patch = tokred.apply(pipe, "toma")
    transformer.compile_repeated_blocks(fullgraph=False, backend="eager")
    computed = Computed(transformer)
    try:
        with attention_backend("_native_math"):
            images = [generate(pipe) for _ in range(3)]
        assert patch.active and patch.stats.total.merged_calls > 0
        assert computed.counts["attention"] < 3 * 5 * STEPS  # the cache skipped work
        # compiled blocks: one count per scheduled call, however many graph breaks (cache gates, the counting hooks)
        assert all(site.calls == 3 * STEPS for site in patch.stats.sites.values())
        for image in images[1:]:  # each image starts afresh: the cache's state and tokred's plans are reset
            torch.testing.assert_close(image, images[0], rtol=0, atol=0)
        assert torch.isfinite(images[0]).all() and not torch.equal(images[0], base)
    finally:
        computed.remove()
        patch.remove()
        transformer.disable_cache()
        pipe.remove_all_hooks()
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block._compiled_call_impl = None  # back to eager for the other tests of this module
        torch._dynamo.reset()
    assert not tokred_hooks(transformer)
    assert torch.equal(generate(pipe), base)
