"""Localities: which tokens of a site's h×w grid may merge with one another."""

from __future__ import annotations

import functools

import torch
from pydantic import Field, PositiveInt

from tokred.registry import Options
from tokred.strategies.base import GroupLayout


@functools.lru_cache(maxsize=256)
def global_layout(h: int, w: int) -> GroupLayout:
    return GroupLayout.from_group_ids((h, w), torch.zeros(h * w, dtype=torch.long))


@functools.lru_cache(maxsize=256)
def tile_layout(h: int, w: int, tile_h: int, tile_w: int) -> GroupLayout:
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    tiles_per_row = -(-w // tile_w)
    exact = (tile_h, tile_w) if h % tile_h == 0 and w % tile_w == 0 else None
    return GroupLayout.from_group_ids((h, w), (rows // tile_h) * tiles_per_row + cols // tile_w, tile=exact)


@functools.lru_cache(maxsize=256)
def stripe_layout(h: int, w: int, count: int) -> GroupLayout:
    count = min(count, h)
    rows = torch.arange(h).repeat_interleave(w)
    return GroupLayout.from_group_ids((h, w), rows * count // h)  # bands differ by at most one row


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return h, w


class GlobalLocality:
    """One group: every token may merge with every other."""

    def __init__(self, options: Options) -> None:
        pass

    def partition(self, grid: tuple[int, int]) -> GroupLayout:
        return global_layout(*_check_grid(grid))


class TileLocality:
    """Tiles of t_h×t_w tokens; edge tiles are smaller (no token dropped or duplicated)."""

    class Options(Options):
        size: tuple[PositiveInt, PositiveInt] = Field((8, 8), description="tile height and width, in tokens")

    def __init__(self, options: TileLocality.Options) -> None:
        self.size = options.size

    def partition(self, grid: tuple[int, int]) -> GroupLayout:
        return tile_layout(*_check_grid(grid), *self.size)


class StripeLocality:
    """k bands of whole rows (sizes differ by at most one row)."""

    class Options(Options):
        count: int = Field(4, ge=1, description="number of bands (at most the number of rows)")

    def __init__(self, options: StripeLocality.Options) -> None:
        self.count = options.count

    def partition(self, grid: tuple[int, int]) -> GroupLayout:
        return stripe_layout(*_check_grid(grid), self.count)
