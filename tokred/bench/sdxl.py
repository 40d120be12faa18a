"""Measurements of the SDXL adapter at real sizes (random weights, real architecture).

- ``block``: one SDXL transformer stage at 64×64 tokens (``Transformer2DModel`` of two
  ``BasicTransformerBlock``s: dim 640, 10 heads, cross-attention dim 2048), B=2, 77 text tokens.
- ``unet``: the whole SDXL UNet (real config) at 1024×1024, batch 1, against tomesd when it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from tokred.bench.compare import Method, Row, compare
from tokred.bench.inputs import denoiser_inputs
from tokred.bench.synthetic import smooth_latents
from tokred.jobs.testbed import SDXL_UNET_CONFIG, unet_from_config


def block_methods(ratio: float) -> list[Method]:
    return [
        Method("baseline", "baseline"),
        Method("toma attn1", config="toma", overrides={"ratio": ratio, "sites": ["attn1"]}),
        Method("toma attn1+ff", config="toma", overrides={"ratio": ratio, "sites": ["attn1", "ff"]}),
    ]


def bench_block(
    *,
    ratio: float = 0.5,
    batch: int = 2,
    grid: int = 64,
    repeats: int = 5,
    dim: int = 640,
    heads: int = 10,
    cross_dim: int = 2048,
    progress: Callable | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    stage = Transformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=dim,
        num_layers=2,
        cross_attention_dim=cross_dim,
        norm_num_groups=32 if dim % 32 == 0 else 8,
        use_linear_projection=True,
    ).eval()
    hidden = smooth_latents(batch, dim, grid, grid, seed=0)
    text = torch.randn(batch, 77, cross_dim, generator=torch.Generator().manual_seed(1))
    rows = compare(
        stage,
        lambda: stage(hidden, encoder_hidden_states=text),
        block_methods(ratio),
        repeats=repeats,
        progress=progress,
    )
    setup = {
        "what": f"SDXL transformer stage (2 BasicTransformerBlocks, dim {dim}, {heads} heads, cross dim {cross_dim})",
        "batch": batch,
        "grid": [grid, grid],
        "text_tokens": 77,
        "ratio": ratio,
        "repeats": repeats,
    }
    return rows, setup


def unet_methods(ratio: float) -> list[Method]:
    methods = [Method("baseline", "baseline"), Method("tokred toma", config="toma", overrides={"ratio": ratio})]
    if importlib.util.find_spec("tomesd") is not None:
        # tomesd's default max_downsample=1 merges nothing on SDXL (no attention at full latent size)
        methods.append(Method("tomesd", "tomesd", config={"ratio": ratio, "max_downsample": 2}))
    return methods


def bench_unet(
    *,
    ratio: float = 0.5,
    size: int = 1024,
    batch: int = 1,
    repeats: int = 1,
    config: dict[str, Any] | None = None,
    progress: Callable | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    config = config or SDXL_UNET_CONFIG
    unet = unet_from_config(config)
    call, _ = denoiser_inputs(unet, height=size, width=size, batch=batch)
    rows = compare(unet, call, unet_methods(ratio), repeats=repeats, progress=progress)
    setup = {
        "what": "SDXL UNet, real config, random weights",
        "size": size,
        "batch": batch,
        "ratio": ratio,
        "repeats": repeats,
        "tomesd": any(r.name == "tomesd" for r in rows),
    }
    return rows, setup
