"""Localities: which tokens of a site's grid — h×w for images, f×h×w for video — may merge with one another."""

from __future__ import annotations

import functools
import math
from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveInt

from tokred.registry import Options
from tokred.strategies.base import Grid, GroupLayout, as_frames


def _positions(grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame, row, column) of every token of a grid, in row-major order."""
    f, h, w = as_frames(grid)
    index = torch.arange(f * h * w)
    return index // (h * w), index % (h * w) // w, index % w


@functools.lru_cache(maxsize=256)
def one_group(grid: Grid) -> GroupLayout:
    return GroupLayout.from_group_ids(grid, torch.zeros(math.prod(grid), dtype=torch.long))


@functools.lru_cache(maxsize=256)
def tiles_of(grid: Grid, tile: Grid) -> GroupLayout:
    """Tiles of ``tile`` = (t_h, t_w) or (t_f, t_h, t_w) tokens; edge tiles are smaller. On a video grid a 2-D tile
    spans one frame; on an image grid a 3-D tile's frame extent does not apply."""
    (f, h, w), (tf, th, tw) = as_frames(grid), as_frames(tile)
    tf = min(tf, f)
    frame, row, col = _positions(grid)
    per_row, per_frame = -(-w // tw), -(-h // th) * -(-w // tw)
    ids = (frame // tf) * per_frame + (row // th) * per_row + col // tw
    exact = f % tf == 0 and h % th == 0 and w % tw == 0
    shape = ((tf, th, tw) if len(grid) == 3 else (th, tw)) if exact else None
    return GroupLayout.from_group_ids(grid, ids, tile=shape)


@functools.lru_cache(maxsize=256)
def stripes_of(grid: Grid, count: int, axis: str = "rows") -> GroupLayout:
    """``count`` bands of whole rows in every frame (axis ``rows``), or of whole frames (axis ``frames``); band sizes
    differ by at most one row or frame."""
    f, h, _ = as_frames(grid)
    frame, row, _ = _positions(grid)
    if axis == "frames":
        count = min(count, f)
        return GroupLayout.from_group_ids(grid, frame * count // f)
    count = min(count, h)
    return GroupLayout.from_group_ids(grid, frame * count + row * count // h)


# the image-grid forms, by their sizes
def global_layout(h: int, w: int) -> GroupLayout:
    return one_group((h, w))


def tile_layout(h: int, w: int, tile_h: int, tile_w: int) -> GroupLayout:
    return tiles_of((h, w), (tile_h, tile_w))


def stripe_layout(h: int, w: int, count: int) -> GroupLayout:
    return stripes_of((h, w), count)


def _check_grid(grid: Grid) -> Grid:
    grid = tuple(int(v) for v in grid)
    as_frames(grid)
    if min(grid) < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return grid


class GlobalLocality:
    """One group: every token may merge with every other."""

    def __init__(self, options: Options) -> None:
        pass

    def partition(self, grid: Grid) -> GroupLayout:
        return one_group(_check_grid(grid))


#: (h, w) or (frames, h, w)
TileSize = Annotated[tuple[PositiveInt, ...], Field(min_length=2, max_length=3)]


class TileLocality:
    """Tiles of t_h×t_w tokens (t_f×t_h×t_w on video); edge tiles are smaller (no token dropped or duplicated)."""

    class Options(Options):
        size: TileSize = Field(
            (8, 8),
            description="tile height and width in tokens, or frames, height and width for video "
            "(a 2-value tile on video spans one frame)",
        )

    def __init__(self, options: TileLocality.Options) -> None:
        self.size = tuple(options.size)

    def partition(self, grid: Grid) -> GroupLayout:
        return tiles_of(_check_grid(grid), self.size)


class StripeLocality:
    """k bands of whole rows in every frame, or of whole frames (sizes differ by at most one row or frame)."""

    class Options(Options):
        count: int = Field(4, ge=1, description="number of bands (at most the number of rows, or of frames)")
        axis: Literal["rows", "frames"] = Field(
            "rows", description="rows: bands of rows in each frame; frames: bands of whole frames (video)"
        )

    def __init__(self, options: StripeLocality.Options) -> None:
        self.count, self.axis = options.count, options.axis

    def partition(self, grid: Grid) -> GroupLayout:
        return stripes_of(_check_grid(grid), self.count, self.axis)
