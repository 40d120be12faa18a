"""hypothesis strategies for token tensors, grids, tiles, ratios and seeds."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

image_grids = st.tuples(st.integers(1, 9), st.integers(1, 9))
video_grids = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6))
grids = st.one_of(image_grids, video_grids)  # (h, w) images and (frames, h, w) video
tiles = st.one_of(st.tuples(st.integers(1, 6), st.integers(1, 6)), st.tuples(*(st.integers(1, 4),) * 3))
ratios = st.floats(0.0, 0.9, allow_nan=False).map(lambda r: round(r, 3))
seeds = st.integers(0, 2**31 - 1)
channels = st.integers(1, 8)

LOCALITIES = ("global", "tiles", "stripes")
SELECTORS = ("toma", "random", "grid")
MERGES = ("attention", "mean", "prune")


@st.composite
def localities(draw) -> dict:
    name = draw(st.sampled_from(LOCALITIES))
    if name == "tiles":
        return {"name": "tiles", "size": list(draw(tiles))}
    if name == "stripes":
        return {"name": "stripes", "count": draw(st.integers(1, 5)), "axis": draw(st.sampled_from(["rows", "frames"]))}
    return {"name": "global"}


@st.composite
def selectors(draw) -> dict:
    name = draw(st.sampled_from(SELECTORS))
    if name == "random":
        return {"name": "random", "seed": draw(seeds)}
    if name == "grid":
        stride = list(draw(st.one_of(st.tuples(*(st.integers(1, 3),) * 2), st.tuples(*(st.integers(1, 2),) * 3))))
        return {"name": "grid", "stride": stride, "random_offset": draw(st.booleans()), "seed": draw(seeds)}
    return {"name": "toma"}


@st.composite
def token_tensors(draw, grid: tuple[int, int], batch: int | None = None) -> torch.Tensor:
    """(B, N, C) float32 tokens with bounded values."""
    b = batch if batch is not None else draw(st.integers(1, 2))
    c = draw(channels)
    values = draw(
        arrays(np.float32, (b, math.prod(grid), c), elements=st.floats(-4, 4, width=32, allow_subnormal=False))
    )
    return torch.from_numpy(values)


def smooth_tokens(grid: tuple[int, int], batch: int, channels: int, seed: int) -> torch.Tensor:
    """Generic (random Gaussian) tokens: distinct directions, no ties to speak of."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, math.prod(grid), channels, generator=gen)
