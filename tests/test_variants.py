"""Pipeline variants people run, on tiny models: ratio 0 is bit-identical, merging shows in the stats, no error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from variant_pipelines import flux_variants, sdxl_variants

import tokred

SDXL = ("img2img", "inpaint", "inpaint_9ch", "controlnet", "refiner", "ip_adapter")
FLUX = ("img2img", "fill", "control", "controlnet", "kontext", "ip_adapter")


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_variants()


@pytest.fixture(scope="module")
def flux():
    return flux_variants()


def run(pipe, kwargs):
    return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images


def check(pipe, kwargs):
    baseline = run(pipe, kwargs)
    with tokred.patched(pipe, "toma", ratio=0.0):
        assert np.array_equal(run(pipe, kwargs), baseline)
    with tokred.patched(pipe, "toma", sites=["attn1", "ff"]) as patch:
        images = run(pipe, kwargs)
    assert np.isfinite(images).all() and not np.array_equal(images, baseline)
    return patch


@pytest.mark.parametrize("name", SDXL)
def test_sdxl_variants(sdxl, name):
    pipe, kwargs = sdxl[name]
    stats = check(pipe, kwargs).stats
    assert stats.total.merged_calls > 0 and stats.total.tokens_out < stats.total.tokens_in


def test_sdxl_ip_adapter_cross_attention_merges_queries_unless_masks_are_laid_on_the_full_grid(sdxl):
    from diffusers.image_processor import IPAdapterMaskProcessor

    pipe, kwargs = sdxl["ip_adapter"]
    with tokred.patched(pipe, "toma", sites=["attn2"]) as patch:
        run(pipe, kwargs)
        merged = patch.stats.total.merged_calls
        masks = IPAdapterMaskProcessor().preprocess([Image_mask()], height=128, width=128)
        patch.reset()
        images = run(pipe, {**kwargs, "cross_attention_kwargs": {"ip_adapter_masks": [masks]}})
        masked = patch.stats.total
    assert merged > 0 and np.isfinite(images).all()
    assert masked.merged_calls == 0  # IP masks are laid on the full query grid: attn2 runs as it is


def Image_mask():
    from variant_pipelines import mask

    return mask()


@pytest.mark.parametrize("name", FLUX)
def test_flux_variants(flux, name):
    pipe, kwargs = flux[name]
    patch = check(pipe, kwargs)
    stats = patch.stats
    assert stats.total.merged_calls > 0 and stats.total.tokens_out < stats.total.tokens_in
    # every site merged: with an IP-adapter, the double blocks' IP processors merge around the processor
    assert all(stats.sites[site.name].merged_calls > 0 for site in patch.sites)


def test_kontext_merges_the_target_grid_and_keeps_the_reference_tokens(flux):
    pipe, kwargs = flux["kontext"]
    with tokred.patched(pipe, "toma") as patch:
        run(pipe, kwargs)
        grids = {plan.grid for plan in patch.engine.plans}
        tokens = {plan.num_tokens for plan in patch.engine.plans}
    assert grids == {(8, 8)} and tokens == {64}  # 64 target tokens merged; the 64 reference tokens pass through


# --- processors replaced while a patch is on ------------------------------------------------------------------------


def _processor_types(model):
    return {type(p).__name__ for p in model.attn_processors.values()}


def test_sdxl_default_processors_fused_qkv_and_saved_processors_after_apply():
    """``set_default_attn_processor`` (it accepts only processor classes it knows), ``fuse_qkv_projections`` and
    ``unfuse_qkv_projections`` replace processors while a patch is on: tokred wraps the new ones at the next call
    instead of stopping silently, and a wrapper kept somewhere after removal is inert."""
    from variant_pipelines import SIZE, tiny_sdxl_pipeline

    kwargs = {"prompt": "a cat", "height": SIZE, "width": SIZE, "num_inference_steps": 2, "output_type": "np"}
    plain = tiny_sdxl_pipeline()
    plain.unet.set_default_attn_processor()
    baseline = run(plain, kwargs)
    pipe = tiny_sdxl_pipeline()
    patch = tokred.apply(pipe, "toma")
    first = run(pipe, kwargs)
    per_image = patch.stats.total.merged_calls
    pipe.unet.set_default_attn_processor()  # raised ValueError on tokred's processors before
    assert not patch.active  # replaced ...
    reduced = run(pipe, kwargs)
    assert patch.active and patch.stats.total.merged_calls == 2 * per_image  # ... and wrapped again at the call
    # the classic processor gets the merged tokens and the sizes as its mask: the same math as tokred's own
    np.testing.assert_allclose(reduced, first, atol=1e-5)
    saved = pipe.unet.attn_processors  # tokred's wrappers, kept by the user
    pipe.fuse_qkv_projections()
    fused = run(pipe, kwargs)
    assert patch.active and patch.stats.total.merged_calls == 3 * per_image
    np.testing.assert_allclose(fused, reduced, atol=1e-4)  # the same math on fused projections
    pipe.unfuse_qkv_projections()
    run(pipe, kwargs)
    assert patch.active and patch.stats.total.merged_calls == 4 * per_image
    patch.remove()
    assert _processor_types(pipe.unet) == {"AttnProcessor"}
    assert np.array_equal(run(pipe, kwargs), baseline)
    pipe.unet.set_attn_processor(saved)  # tokred's old wrappers put back after removal: they do nothing
    assert np.array_equal(run(pipe, kwargs), baseline) and patch.stats.total.merged_calls == 4 * per_image


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_ip_adapter_loaded_after_apply(family):
    """diffusers' IP-adapter loading rebuilds every processor as ``processor.__class__()`` and installs IP
    processors (modules with weights): loaded while a patch is on, it gives what loading it first gives."""
    import variant_pipelines as vp

    if family == "sdxl":
        make, state = vp.tiny_sdxl_pipeline, vp._sdxl_ip_adapter_state_dict
        dim = vp.tiny_sdxl_pipeline().unet.config.cross_attention_dim
        embeds = torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(2))
        kwargs = {"ip_adapter_image_embeds": [embeds], "height": vp.SIZE, "width": vp.SIZE}
    else:
        make, state = vp.tiny_flux_pipeline, vp._flux_ip_adapter_state_dict
        embeds = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(2))
        kwargs = {
            "ip_adapter_image_embeds": [embeds],
            "negative_ip_adapter_image_embeds": [torch.zeros(1, 1, 48)],
            "height": vp.SIZE,
            "width": vp.SIZE,
            "max_sequence_length": 16,
        }
    kwargs = {**kwargs, "prompt": "a cat", "num_inference_steps": 2, "output_type": "np"}

    def load(pipe):
        denoiser = pipe.unet if family == "sdxl" else pipe.transformer
        torch.manual_seed(3)
        denoiser._load_ip_adapter_weights([state(denoiser)])

    first = make()
    load(first)
    baseline = run(first, kwargs)
    sites = ["attn1", "attn2"] if family == "sdxl" else ["attn1"]
    with tokred.patched(first, "toma", sites=sites) as reference:
        expected = run(first, kwargs)
    pipe = make()
    patch = tokred.apply(pipe, "toma", sites=sites)
    load(pipe)
    images = run(pipe, kwargs)
    assert patch.active
    assert {n: s.merged_calls for n, s in patch.stats.sites.items()} == {
        n: s.merged_calls for n, s in reference.stats.sites.items()
    }
    np.testing.assert_allclose(images, expected, atol=1e-5)
    # at IP scale 0 the IP processors, which tokred reduces around, give what the plain processors give
    pipe.set_ip_adapter_scale(0.0)
    plain = make()
    with tokred.patched(plain, "toma", sites=sites):
        without = run(plain, {k: v for k, v in kwargs.items() if "ip_adapter" not in k})
    np.testing.assert_allclose(run(pipe, kwargs), without, atol=1e-5)
    pipe.set_ip_adapter_scale(1.0)
    patch.remove()
    np.testing.assert_allclose(run(pipe, kwargs), baseline, atol=1e-6)
    assert not any(
        name.startswith("SiteProcessor")
        for name in _processor_types(pipe.unet if family == "sdxl" else pipe.transformer)
    )
