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
