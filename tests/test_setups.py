"""tokred in the setups users run: CPU offload, attention backends, torch.compile, batches and CFG, bare models,
odd shapes, defaults and loading. Each test here failed (or could not be written) before the fix it guards."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, CpuOffload
from test_flux import transformer_inputs

import tokred
from tokred.adapters.hooks import tokred_hooks
from tokred.jobs.testbed import (
    TINY_FLUX_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    flux_transformer,
    tiny_flux_pipeline,
    tiny_sdxl_pipeline,
    unet_from_config,
)

EVERY_2 = {"name": "interval", "every": 2}


def generate(pipe, steps=3, size=64, width=None, seed=0, **kwargs):
    extra = {"max_sequence_length": 16} if "Flux" in type(pipe).__name__ else {}
    return pipe(
        prompt="a squirrel",
        num_inference_steps=steps,
        height=size,
        width=width or size,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **extra,
        **kwargs,
    ).images


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def sequential_offload(pipe):
    """``pipe.enable_sequential_cpu_offload`` as it runs on an accelerator, on the CPU: diffusers 0.42.1 turns the
    device into ``cpu:0``, which accelerate 1.15 mishandles (TypeError), so the same per-component
    ``accelerate.cpu_offload`` is called with ``cpu``. Parameters live on ``meta`` between calls, as on a GPU."""
    pipe.remove_all_hooks()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)
    pipe._offload_device = torch.device("cpu")


def offload(pipe, kind):
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        sequential_offload(pipe)


class Spy:
    """Counts accelerate's hook calls on the denoiser root (by hook class)."""

    def __init__(self, monkeypatch, model):
        self.calls = 0
        for cls in (CpuOffload, AlignDevicesHook):
            original = cls.pre_forward

            def pre_forward(hook, module, *args, _original=original, **kwargs):
                if module is model:
                    self.calls += 1
                return _original(hook, module, *args, **kwargs)

            monkeypatch.setattr(cls, "pre_forward", pre_forward)


# --- 1. CPU offload --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sdxl", "flux"])
@pytest.mark.parametrize("kind", ["model", "sequential"])
@pytest.mark.parametrize("order", ["offload_then_tokred", "tokred_then_offload"])
def test_offload_keeps_steps_grids_and_removal_in_either_order(monkeypatch, family, kind, order):
    build = tiny_sdxl_pipeline if family == "sdxl" else tiny_flux_pipeline
    reference = build()
    sizes = (64, 64, 96) if family == "sdxl" else (64, 96, 128)  # Flux's grid follows each image's size
    with tokred.patched(reference, "toma", schedule=EVERY_2):
        expected = [generate(reference, size=size) for size in sizes]
    pipe = build()
    if order == "offload_then_tokred":
        offload(pipe, kind)
        patch = tokred.apply(pipe, "toma", schedule=EVERY_2)
    else:
        patch = tokred.apply(pipe, "toma", schedule=EVERY_2)
        offload(pipe, kind)
    spy = Spy(monkeypatch, denoiser(pipe))
    for size, want in zip(sizes, expected, strict=True):
        patch.reset()
        images = generate(pipe, size=size)
        assert patch.active
        assert (patch.stats.model_calls, patch.stats.steps) == (3, 3), (size, patch.stats)
        assert patch.stats.total.plan_builds > 0 and patch.stats.total.merged_calls > 0
        if family == "flux":
            assert {plan.grid for plan in patch.engine.plans} == {(size // 16, size // 16)}
        np.testing.assert_allclose(images, want, atol=1e-5)
    assert spy.calls >= 3  # accelerate ran on every image
    tokred.remove(pipe)
    assert not patch.active and not tokred_hooks(denoiser(pipe))
    calls = spy.calls
    generate(pipe, size=64)
    assert spy.calls > calls  # accelerate's hooks still work after removal
    assert hasattr(denoiser(pipe), "_hf_hook")
    with tokred.patched(reference, "toma", ratio=0.0):
        np.testing.assert_allclose(generate(pipe, size=64), generate(reference, size=64), atol=1e-5)


# --- 2. attention backends ---------------------------------------------------------------------------------------


flux_inputs = transformer_inputs  # the Flux transformer's inputs on a grid, as test_flux makes them


def unet_inputs(unet, batch=2, height=16, width=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(batch, config.in_channels, height, width, generator=gen).to(dtype)
    ehs = torch.randn(batch, 7, config.cross_attention_dim, generator=gen).to(dtype)
    text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    kwargs = {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, text, generator=gen).to(dtype),
            "time_ids": torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch).to(dtype),
        }
    }
    return sample, ehs, kwargs


class SDPASpy:
    """Records whether each call of torch's SDPA got a mask, and the head dims it saw."""

    def __init__(self, monkeypatch):
        self.masks: list[bool] = []
        self.head_dims: set[int] = set()
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, *args, **kwargs):
            self.masks.append(attn_mask is not None)
            self.head_dims.add(query.shape[-1])
            return original(query, key, value, attn_mask, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def test_fold_equals_the_masked_form_to_fp32_rounding():
    from tokred.adapters.attention import attend

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, 3, 40, generator=gen) for _ in range(3))  # head dim 40 -> folded 48
    bias = torch.log(torch.rand(2, 13, generator=gen) * 4 + 1)
    masked = attend(q, k, v, key_bias=bias, way="mask", backend="torch-sdpa")
    folded = attend(q, k, v, key_bias=bias, way="fold", backend="torch-sdpa")
    flex = attend(q, k, v, key_bias=bias, way="flex", backend="torch-sdpa")
    plain = attend(q, k, v, key_bias=None, way="off", backend="torch-sdpa")
    torch.testing.assert_close(folded, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex, masked, rtol=0, atol=1e-5)
    assert folded.shape == q.shape and not torch.allclose(folded, plain, atol=1e-3)


@pytest.mark.parametrize("backend", ["native", "_native_math", "flex", "_native_flash"])
@pytest.mark.parametrize("scope", ["global", "processor"])
def test_flux_runs_exactly_under_every_backend_that_runs_here(monkeypatch, backend, scope):
    """The default config under each backend: never a crash, never a silent change of the math — every backend
    gives the output of the native reference (proportional attention included), and none is handed a mask."""
    from diffusers import attention_backend
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = flux_transformer(TINY_FLUX_CONFIG)
    inputs = flux_inputs(model)
    with torch.no_grad(), tokred.patched(model, "toma") as patch:
        reference = model(**inputs).sample
        spy = SDPASpy(monkeypatch)
        saved = _AttentionBackendRegistry.get_active_backend()[0]
        try:
            if scope == "global":
                with attention_backend(backend):
                    out = model(**inputs).sample
            else:
                model.set_attention_backend(backend)  # per processor (through tokred's processors)
                out = model(**inputs).sample
        finally:
            model.reset_attention_backend()
            _AttentionBackendRegistry.set_active_backend(AttentionBackendName(saved.value))
        merged = patch.stats.total.merged_calls
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert merged > 0
    if backend != "flex":
        assert spy.masks and not any(spy.masks)  # auto folds: no mask reaches the kernel
        assert 24 in spy.head_dims  # head dim 16 + 8 folded channels


def test_sdxl_self_attention_folds_and_passes_no_mask(monkeypatch):
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad():
        outs = {}
        for way in ("mask", "fold", "flex", "off"):
            spy = SDPASpy(monkeypatch)
            with tokred.patched(unet, "toma", proportional=way):
                outs[way] = unet(sample, torch.tensor(500), ehs, **kwargs).sample
            if way == "fold":
                assert spy.masks and not any(spy.masks)
            if way == "mask":
                assert any(spy.masks)
        with tokred.patched(unet, "toma"):
            auto = unet(sample, torch.tensor(500), ehs, **kwargs).sample
    torch.testing.assert_close(outs["fold"], outs["mask"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["flex"], outs["mask"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto, outs["fold"], rtol=0, atol=0)
    assert not torch.allclose(outs["off"], outs["mask"], atol=1e-5)


def test_backends_that_cannot_run_here_are_judged_by_their_declared_support(caplog):
    from tokred.adapters.attention import choose_way

    with caplog.at_level(logging.WARNING):
        assert choose_way("auto", "_native_flash", 64) == "fold"  # refuses masks: fold keeps flash
        assert choose_way("auto", "flash", 128) == "fold"  # folded head dim 136 <= 256
        assert choose_way("auto", "xformers", 64) == "fold"
        assert choose_way("auto", "native", 64) == "fold"
        assert choose_way("mask", "native", 64) == "mask"
        assert choose_way("mask", "_native_flash", 64) == "fold"  # asked mask, refused: the same math by fold
        assert choose_way("auto", "sage", 128) == "off"  # sage kernels take head dims 64/96/128 only, no mask
        assert choose_way("auto", "sage", 64) == "off"
        assert choose_way("auto", "xformers", 256) == "mask"  # folded 264 is too wide; xformers takes masks
        assert choose_way("auto", "flash", 256) == "off"  # too wide to fold, and flash refuses masks
        assert choose_way("off", "native", 64) == "off"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'sage'" in m for m in messages) == 1  # one warning per backend, not one per call
    assert sum("'flash'" in m for m in messages) == 1
    assert any("'mask' does not run on attention backend '_native_flash'; using 'fold'" in m for m in messages)


# --- 3. torch.compile ----------------------------------------------------------------------------------------------


def _unet_call(unet, sample, ehs, kwargs):
    return lambda t: unet(sample, torch.tensor(t), ehs, **kwargs).sample


def _flux_call(model, inputs):
    return lambda t: model(**{**inputs, "timestep": torch.full((inputs["hidden_states"].shape[0],), t / 1000)}).sample


@pytest.fixture
def dynamo_reset():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _models(family):
    if family == "sdxl":
        unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
        sample, ehs, kwargs = unet_inputs(unet)
        return unet, _unet_call(unet, sample, ehs, kwargs)
    model = flux_transformer(TINY_FLUX_CONFIG)
    return model, _flux_call(model, flux_inputs(model))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_regional_compile_fullgraph_with_plan_builds_and_reuses(dynamo_reset, family):
    """diffusers' recommended ``compile_repeated_blocks(fullgraph=True)``: several steps, plans built at steps 0
    and 2 and reused between, one graph per block class and token count (not one per block)."""
    from torch._dynamo.testing import CompileCounter

    model, call = _models(family)
    timesteps = (900, 800, 700, 600)
    with torch.no_grad():
        eager = [call(t) for t in timesteps]
        with tokred.patched(model, "toma", schedule=EVERY_2, sites=["attn1", "ff"]) as patch:
            patched_eager = [call(t) for t in timesteps]
        counter = CompileCounter()
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
        with tokred.patched(model, "toma", schedule=EVERY_2, sites=["attn1", "ff"]) as patch:
            compiled, frames = [], []
            for t in timesteps:
                compiled.append(call(t))
                frames.append(counter.frame_count)
            stats = patch.stats
        unpatched = call(timesteps[0])
    families = 1 if family == "sdxl" else 2
    stages = 2 if family == "sdxl" else 1
    assert stats.steps == 4 and stats.total.plan_builds == families * stages * 2  # at steps 0 and 2
    assert stats.total.plan_reuses > 0 and stats.total.merged_calls == stats.total.calls
    # compiled once, on the first call: no recompile when plans are rebuilt or reused, none per block
    assert frames == [frames[0]] * len(timesteps) and frames[0] <= 3 * families, frames
    torch.testing.assert_close(unpatched, eager[0], rtol=1e-5, atol=1e-5)
    for base, reduced, reference in zip(eager, compiled, patched_eager, strict=True):
        assert torch.isfinite(reduced).all() and not torch.equal(reduced, base)
        # compiled blocks merge with plans from the scope's entry tokens: close to eager merging, not equal
        deviation = float((reduced - base).norm() / base.norm())
        assert deviation < 3 * float((reference - base).norm() / base.norm()) + 1e-3


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_whole_model_compile_runs_with_plans_prepared_outside_the_graph(dynamo_reset, family):
    from torch._dynamo.testing import CompileCounter

    model, _ = _models(family)
    counter = CompileCounter()
    compiled_model = torch.compile(model, backend=counter)
    if family == "sdxl":
        sample, ehs, kwargs = unet_inputs(model)
        call = _unet_call(compiled_model, sample, ehs, kwargs)
    else:
        call = _flux_call(compiled_model, flux_inputs(model))
    with torch.no_grad(), tokred.patched(compiled_model, "toma", schedule=EVERY_2) as patch:
        outs = [call(t) for t in (900, 800, 700)]
        assert patch.model is model
        assert patch.stats.total.merged_calls > 0 and patch.stats.total.plan_reuses > 0
    assert all(torch.isfinite(out).all() for out in outs) and counter.frame_count > 0


# --- 4. SDXL blocks in forward order -------------------------------------------------------------------------------


def test_unet_blocks_are_numbered_in_forward_order():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    order: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name, module in unet.named_modules()
        if name.endswith("attn1")
    ]
    sample, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad():
        unet(sample, torch.tensor(500), ehs, **kwargs)
    for hook in hooks:
        hook.remove()
    with tokred.patched(unet, "toma") as patch:
        numbered = {site.name.removesuffix(".attn1"): site.block for site in patch.sites}
    assert [numbered[name.removesuffix(".attn1")] for name in order] == list(range(len(order)))
    assert (
        numbered["mid_block.attentions.0.transformer_blocks.0"]
        < numbered["up_blocks.0.attentions.0.transformer_blocks.0"]
    )
    # schedule.blocks now selects by that order: the first two blocks run are the down path's
    with tokred.patched(unet, "toma", schedule={"name": "interval", "blocks": "0-1"}) as patch, torch.no_grad():
        unet(sample, torch.tensor(500), ehs, **kwargs)
        merged = [name for name, stats in patch.stats.sites.items() if stats.merged_calls]
    assert merged and all(name.startswith("down_blocks.") for name in merged)


# --- 5. batches and CFG branches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tokens", "kv"])
@pytest.mark.parametrize("preset", ["toma", "random"])
def test_a_flux_image_does_not_depend_on_its_batch_mates(mode, preset):
    model = flux_transformer(TINY_FLUX_CONFIG)
    pair = flux_inputs(model, batch=2, seed=0)
    other = flux_inputs(model, batch=2, seed=1)
    mixed = {
        key: torch.cat((pair[key][:1], other[key][1:])) if key not in ("img_ids", "txt_ids") else pair[key]
        for key in pair
    }
    alone = {key: value[:1] if key not in ("img_ids", "txt_ids") else value for key, value in pair.items()}
    with (
        torch.no_grad(),
        tokred.patched(model, preset, mode=mode, sites=["attn1", "ff"] if mode == "tokens" else ["attn1"]) as patch,
    ):
        a = model(**pair).sample[0]
        b = model(**mixed).sample[0]
        c = model(**alone).sample[0]
        assert patch.stats.total.merged_calls > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_sdxl_batch_of_three_is_per_image():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, ehs, kwargs = unet_inputs(unet, batch=3)
    with torch.no_grad(), tokred.patched(unet, "toma", sites=["attn1", "attn2", "ff"]):
        three = unet(sample, torch.tensor(500), ehs, **kwargs).sample
        one = unet(
            sample[1:2],
            torch.tensor(500),
            ehs[1:2],
            added_cond_kwargs={k: v[1:2] for k, v in kwargs["added_cond_kwargs"].items()},
        ).sample
    torch.testing.assert_close(three[1:2], one, rtol=0, atol=1e-5)


# --- 7. bare models and one-step runs --------------------------------------------------------------------------------


def test_a_bare_model_says_when_it_cannot_tell_images_apart_and_new_run_tells_it(caplog):
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    a = unet_inputs(unet, seed=0)
    b = unet_inputs(unet, seed=1)
    one_step = torch.tensor(999)
    with torch.no_grad():
        with tokred.patched(unet, "toma") as fresh:
            expected_b = unet(b[0], one_step, b[1], **b[2]).sample
        with caplog.at_level(logging.WARNING), tokred.patched(unet, "toma") as patch:
            unet(a[0], one_step, a[1], **a[2])
            stale_b = unet(b[0], one_step, b[1], **b[2]).sample  # reuses image A's plans
            assert patch.stats.total.plan_reuses > 0
            patch.new_run()
            new_b = unet(b[0], one_step, b[1], **b[2]).sample
    warnings = [r.getMessage() for r in caplog.records if "patch.new_run()" in r.getMessage()]
    assert len(warnings) == 1 and "cannot tell a new image" in warnings[0]
    assert torch.equal(new_b, expected_b) and not torch.equal(stale_b, expected_b)
    assert fresh.stats.total.plan_builds == 2


def test_a_patched_pipeline_starts_each_one_step_image_fresh(caplog):
    pipe = tiny_sdxl_pipeline()
    with caplog.at_level(logging.WARNING), tokred.patched(pipe, "toma") as patch:
        generate(pipe, steps=1, seed=0)
        generate(pipe, steps=1, seed=1)
        assert patch.stats.total.plan_builds == 2 * 2  # two stages, built afresh for each image
    assert not [r for r in caplog.records if "new_run" in r.getMessage()]


# --- 10. odd shapes ---------------------------------------------------------------------------------------------------


def test_sizes_whose_merged_counts_are_not_multiples_of_8():
    pipe = tiny_sdxl_pipeline()
    with tokred.patched(pipe, "toma", sites=["attn1", "attn2", "ff"]) as patch:
        images = generate(pipe, steps=1, size=832, width=1216)  # latents 104x152: stages 52x76 and 26x38
        grids = {plan.grid for plan in patch.engine.plans}
        kept = {plan.num_destinations % 8 for plan in patch.engine.plans}
    assert images.shape == (1, 832, 1216, 3) and np.isfinite(images).all()
    assert grids == {(52, 76), (26, 38)} and kept != {0}
    with tokred.patched(pipe, "toma", proportional="mask") as patch:
        images = generate(pipe, steps=1, size=200, width=312)  # 13x20 and 7x10: ragged tiles, odd counts
    assert np.isfinite(images).all() and patch.stats.total.merged_calls > 0


def test_flux_tokens_that_are_no_grid_are_skipped_and_counted():
    model = flux_transformer(TINY_FLUX_CONFIG)
    inputs = flux_inputs(model, batch=1)
    inputs["img_ids"] = inputs["img_ids"].flip(0)  # not row-major: no grid to merge on
    with torch.no_grad():
        base = model(**inputs).sample
        with tokred.patched(model, "toma") as patch:
            out = model(**inputs).sample
    assert torch.equal(out, base)
    assert patch.stats.total.merged_calls == 0 and patch.stats.total.skipped == patch.stats.total.calls > 0


# --- 9. defaults and loading -----------------------------------------------------------------------------------------


def test_one_adapter_that_cannot_be_imported_does_not_stop_the_others(monkeypatch):
    from tokred.adapters import builtin

    monkeypatch.setitem(sys.modules, "tokred.adapters.flux", None)  # importing it raises ImportError
    monkeypatch.setattr(builtin, "_unavailable", {})
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    with pytest.warns(RuntimeWarning, match="tokred adapter 'flux' is unavailable"):
        model = flux_transformer(TINY_FLUX_CONFIG)
        with pytest.raises(tokred.TokredError, match="no tokred adapter handles FluxTransformer2DModel"):
            tokred.apply(model, "toma")
    with tokred.patched(unet, "toma") as patch:
        assert patch.adapter == "sdxl" and patch.active


def test_local_pipelines_load_in_the_dtype_asked(tmp_path):
    from tokred.jobs.sources import load_pipeline, resolve_device

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "pipe")
    pipe = load_pipeline(str(tmp_path / "pipe"), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)  # no CUDA here
    assert resolve_device("cpu", "fp16") == (torch.device("cpu"), torch.float16)
    with pytest.raises(tokred.TokredError, match="cuda was asked for"):
        resolve_device("cuda", "auto")


# --- 8. ratio 0 leaves the model untouched ---------------------------------------------------------------------------


def test_ratio_zero_registers_nothing_so_faster_cache_runs_as_without_tokred():
    """diffusers' FasterCache looks for hook registries on the model: a ratio-0 patch must not add any."""
    from diffusers import FasterCacheConfig

    pipe = tiny_flux_pipeline()
    config = FasterCacheConfig(
        spatial_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=lambda: pipe.current_timestep,
        is_guidance_distilled=True,
        tensor_format="BCHW",
    )
    pipe.transformer.enable_cache(config)
    cached = generate(pipe, steps=6)
    registries = {name for name, m in pipe.transformer.named_modules() if hasattr(m, "_diffusers_hook")}
    with tokred.patched(pipe, "toma", ratio=0.0) as patch:
        assert np.array_equal(generate(pipe, steps=6), cached) and not patch.active
        assert {name for name, m in pipe.transformer.named_modules() if hasattr(m, "_diffusers_hook")} == registries
    pipe.transformer.disable_cache()


# --- 11. no read back from the device on a step that reuses plans ------------------------------------------------

#: tensor methods that read values back to the host (on a GPU, each waits for the device)
READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"})


def _syncs(fn) -> int:
    """How many times ``fn`` reads tensor values back to the host (counted by a torch function mode)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        reads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in READS:
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.reads


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_patched_pipeline_adds_no_device_read_back(family):
    """The same pipeline run, unpatched and patched (plans built at steps 0 and 3, reused between): tokred adds no
    item / _local_scalar_dense / nonzero, neither when building plans nor when applying them (Flux reads its ids'
    grid once per image, in one read)."""
    pipe = (tiny_sdxl_pipeline if family == "sdxl" else tiny_flux_pipeline)()
    run = lambda: generate(pipe, steps=6)  # noqa: E731
    run()
    plain = _syncs(run)
    with tokred.patched(pipe, "toma", schedule={"name": "interval", "every": 3}, sites=["attn1", "ff"]) as patch:
        run()
        patched = _syncs(run)
        assert patch.stats.total.plan_reuses > 0 and patch.stats.total.plan_builds > 0
    assert patched - plain == (0 if family == "sdxl" else 1), (plain, patched)


def test_a_bare_model_reads_only_the_timestep_when_plans_are_reused():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, ehs, kwargs = unet_inputs(unet)
    with torch.no_grad(), tokred.patched(unet, "toma", schedule={"name": "interval", "every": 3}):
        unet(sample, torch.tensor(900), ehs, **kwargs)
        plain_call = _syncs(lambda: unet(sample, torch.tensor(800), ehs, **kwargs))
    with torch.no_grad():
        unpatched = _syncs(lambda: unet(sample, torch.tensor(800), ehs, **kwargs))
    assert plain_call - unpatched == 1  # the timestep, read once per call
