"""Measurements of the Flux adapter at real width (random weights).

- ``block``: one ``FluxSingleTransformerBlock`` (3072 = 24 heads × 128) at 4096 image + 512 text tokens, inside a
  ``FluxTransformer2DModel`` with no other block (the adapter reads the grid and steps at the model's entry).
- ``model``: a real-width Flux transformer of reduced depth (2 double + 4 single blocks) at 1024×1024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred.compare import Method, Row, compare
from tokred.models import FLUX_DEV_CONFIG, flux_transformer
from tokred.synthetic import smooth_tokens


def flux_methods(ratio: float) -> list[Method]:
    return [
        Method("baseline", "baseline"),
        Method("toma tokens", config="toma", overrides={"ratio": ratio}),
        Method("toma kv", config="toma", overrides={"ratio": ratio, "mode": "kv"}),
    ]


def flux_inputs(model: torch.nn.Module, grid: tuple[int, int], text_len: int, batch: int = 1) -> dict[str, Any]:
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return {
        "hidden_states": smooth_tokens(grid, cfg.in_channels, batch=batch, seed=0),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(text_len, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def bench_flux(
    *,
    double: int,
    single: int,
    size: int = 1024,
    text_len: int = 512,
    ratio: float = 0.5,
    repeats: int = 3,
    config: dict[str, Any] | None = None,
    progress: Callable | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    model = flux_transformer(config or FLUX_DEV_CONFIG, num_layers=double, num_single_layers=single)
    grid = (size // 16, size // 16)
    inputs = flux_inputs(model, grid, text_len)
    rows = compare(model, lambda: model(**inputs), flux_methods(ratio), repeats=repeats, progress=progress)
    setup = {
        "what": f"Flux transformer at real width, {double} double + {single} single blocks, random weights",
        "size": size,
        "image_tokens": grid[0] * grid[1],
        "text_tokens": text_len,
        "batch": 1,
        "ratio": ratio,
        "repeats": repeats,
    }
    return rows, setup
