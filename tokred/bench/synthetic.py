"""Structured synthetic inputs: smooth, low-frequency fields like diffusion latents and features.

Random weights are all there is offline, so quality is measured as deviation from the unmodified computation
on inputs with spatial structure (white noise has none, and no token reduction can do well on it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def smooth_tokens(
    grid: tuple[int, int],
    channels: int,
    *,
    batch: int = 1,
    waves: int = 6,
    noise: float = 0.05,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(batch, h·w, channels) tokens: a sum of a few random low-frequency plane waves, plus a little noise."""
    h, w = grid
    gen = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0.0, 1.0, h).view(h, 1)
    cols = torch.linspace(0.0, 1.0, w).view(1, w)
    field = torch.zeros(batch, h, w, channels)
    for _ in range(waves):
        freq_r, freq_c = (torch.rand(2, generator=gen) * 3.0).tolist()
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        amplitude = torch.randn(batch, 1, 1, channels, generator=gen)
        field += amplitude * torch.sin(2 * math.pi * (freq_r * rows + freq_c * cols) + phase).unsqueeze(-1)
    field /= math.sqrt(waves)
    field += noise * torch.randn(field.shape, generator=gen)
    return field.view(batch, h * w, channels).to(device=device, dtype=dtype)


def smooth_latents(
    batch: int, channels: int, height: int, width: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(batch, channels, height, width) smooth latents, for feeding whole denoisers."""
    tokens = smooth_tokens((height, width), channels, batch=batch, seed=seed, dtype=dtype)
    return tokens.view(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def smooth_video(
    batch: int,
    channels: int,
    frames: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(batch, channels, frames, height, width) latents that change slowly over time: each frame a blend of two
    smooth fields, turning from one to the other across the clip (consecutive frames are alike, as in video)."""
    first = smooth_tokens((height, width), channels, batch=batch, seed=seed)
    second = smooth_tokens((height, width), channels, batch=batch, seed=seed + 7919)
    angles = torch.linspace(0.0, math.pi / 2, frames).view(1, frames, 1, 1)
    clip = torch.cos(angles) * first.unsqueeze(1) + torch.sin(angles) * second.unsqueeze(1)  # (B, F, N, C)
    return clip.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3).contiguous().to(dtype)
