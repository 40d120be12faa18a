"""Measurements of the Flux adapter at real width (random weights).

- ``block``: one ``FluxSingleTransformerBlock`` (3072 = 24 heads × 128) at 4096 image + 512 text tokens, inside a
  ``FluxTransformer2DModel`` with no other block (the adapter reads the grid and steps at the model's entry).
- ``model``: a real-width Flux transformer of reduced depth (2 double + 4 single blocks) at 1024×1024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokred.bench.compare import Method, Row, compare
from tokred.bench.inputs import denoiser_inputs
from tokred.jobs.testbed import FLUX_DEV_CONFIG, flux_transformer


def flux_methods(ratio: float) -> list[Method]:
    return [
        Method("baseline", "baseline"),
        Method("toma tokens", config="toma", overrides={"ratio": ratio}),
        Method("toma kv", config="toma", overrides={"ratio": ratio, "mode": "kv"}),
    ]


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
    call, _ = denoiser_inputs(model, height=size, width=size, text_tokens=text_len)
    rows = compare(model, call, flux_methods(ratio), repeats=repeats, progress=progress)
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
