"""Selectors: which tokens of each group become destinations."""

from __future__ import annotations

import functools
import itertools
from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from tokred.registry import Options
from tokred.strategies.base import SelectionContext, as_frames, select_by_priority
from tokred.strategies.facility_location import (
    greedy_facility_location,
    nonnegative_similarity,
    stochastic_greedy_facility_location,
)

#: the largest group for which ``toma``'s auto greedy is exact
EXACT_UP_TO = 1024


def _generator(ctx: SelectionContext, seed: int) -> torch.Generator:
    """The caller's generator when it passed one, else one seeded from ``seed`` and the context's salt."""
    if ctx.generator is not None:
        return ctx.generator
    return torch.Generator(device=ctx.features.device).manual_seed((seed + 1_000_003 * ctx.salt) % 2**63)


class FacilityLocationSelector:
    """ToMA: greedy submodular facility location on cosine similarity, within each group."""

    class Options(Options):
        greedy: Literal["auto", "exact", "stochastic"] = Field(
            "auto",
            description="exact greedy (O(d·n²) per group, within 1−1/e of the optimum), stochastic greedy "
            "(O(n²·ln 1/ε), within 1−1/e−ε in expectation), or auto: exact for groups of up to "
            f"{EXACT_UP_TO} tokens (every tile), stochastic above (global locality at SDXL sizes)",
        )
        epsilon: float = Field(0.1, gt=0.0, lt=1.0, description="ε of stochastic greedy")
        seed: int = Field(0, description="seed of stochastic greedy's draws")

    def __init__(self, options: FacilityLocationSelector.Options | None = None) -> None:
        options = options or self.Options()
        self.greedy, self.epsilon, self.seed = options.greedy, options.epsilon, options.seed

    def select(self, ctx: SelectionContext) -> Tensor:
        s = nonnegative_similarity(ctx.similarity, ctx.layout.valid)
        n = ctx.layout.group_size
        if self.greedy == "exact" or (self.greedy == "auto" and n <= EXACT_UP_TO):
            symmetric = ctx.layout.regular  # no padded slot: the cosine similarity is symmetric
            indices, _ = greedy_facility_location(s, ctx.layout.valid, ctx.max_destinations, symmetric)
        else:
            generator = _generator(ctx, self.seed)
            indices, _ = stochastic_greedy_facility_location(
                s, ctx.layout.valid, ctx.max_destinations, self.epsilon, generator
            )
        return indices


class RandomSelector:
    """Uniformly random destinations, from a seeded generator (reproducible)."""

    class Options(Options):
        seed: int = Field(0, description="seed of the torch.Generator")

    def __init__(self, options: RandomSelector.Options) -> None:
        self.seed = options.seed

    def select(self, ctx: SelectionContext) -> Tensor:
        shape = (ctx.batch_size, ctx.layout.num_groups, ctx.layout.group_size)
        draw = torch.rand(shape, generator=_generator(ctx, self.seed), device=ctx.features.device)
        return select_by_priority(ctx, draw)


@functools.lru_cache(maxsize=64)
def spread_order(*stride: int) -> tuple[int, ...]:
    """The phases of a cell of ``stride`` (s_h, s_w) or (s_f, s_h, s_w), each next one farthest (on the torus) from
    those already taken; returns each phase's rank (phases numbered row-major)."""
    phases = [tuple(p) for p in itertools.product(*(range(n) for n in stride))]

    def dist(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        return sum(min(abs(x - y), n - abs(x - y)) ** 2 for x, y, n in zip(a, b, stride, strict=True))

    order = [0]
    while len(order) < len(phases):
        rest = [p for p in range(len(phases)) if p not in order]
        order.append(max(rest, key=lambda p: (min(dist(phases[p], phases[q]) for q in order), -p)))
    rank = [0] * len(phases)
    for position, phase in enumerate(order):
        rank[phase] = position
    return tuple(rank)


#: (h, w) or (frames, h, w)
Stride = Annotated[tuple[PositiveInt, ...], Field(min_length=2, max_length=3)]


class GridSelector:
    """One destination per s_h×s_w cell first (s_f×s_h×s_w on video; ToMeSD/ToDo-like), then the cells' other
    phases, spread out."""

    class Options(Options):
        stride: Stride = Field(
            (2, 2), description="cell height and width in tokens, or frames, height and width (video)"
        )
        random_offset: bool = Field(False, description="pick the position inside each cell at random")
        seed: int = Field(0, description="seed for random_offset")

    def __init__(self, options: GridSelector.Options) -> None:
        self.stride = tuple(options.stride)
        self.random_offset = options.random_offset
        self.seed = options.seed

    def priority(self, ctx: SelectionContext) -> Tensor:
        """(G, n) or (B, G, n) integer priorities: phase rank inside the cell, then a spread order of cells."""
        f, h, w = as_frames(ctx.layout.grid)
        sf, sh, sw = as_frames(self.stride)
        sf = min(sf, f)
        rows, cols = ctx.layout.coords.unbind(-1)
        frames = ctx.layout.frames
        phase = ((frames % sf) * sh + rows % sh) * sw + cols % sw
        cells_w, cells_h = -(-w // sw), -(-h // sh)
        num_cells = -(-f // sf) * cells_h * cells_w
        cell = ((frames // sf) * cells_h + rows // sh) * cells_w + cols // sw
        phases = sf * sh * sw
        device = ctx.features.device
        if self.random_offset:
            draw = torch.rand((ctx.batch_size, num_cells, phases), generator=_generator(ctx, self.seed), device=device)
            # phases that fall outside the grid (edge cells) must rank last, or an edge cell may get nothing
            p, c = torch.arange(phases, device=device), torch.arange(num_cells, device=device)
            p_f, p_r, p_c = p // (sh * sw), p // sw % sh, p % sw
            c_f, c_r, c_c = c // (cells_h * cells_w), c // cells_w % cells_h, c % cells_w
            outside = (
                ((c_f * sf).unsqueeze(1) + p_f >= f)
                | ((c_r * sh).unsqueeze(1) + p_r >= h)
                | ((c_c * sw).unsqueeze(1) + p_c >= w)
            )
            draw = draw.masked_fill(outside, 2.0)
            ranks = draw.argsort(-1).argsort(-1)  # a random phase order per cell and batch element
            batch = torch.arange(ctx.batch_size, device=device).view(-1, 1, 1)
            phase_rank = ranks[batch, cell.unsqueeze(0), phase.unsqueeze(0)]
        else:
            phase_rank = torch.tensor(spread_order(sf, sh, sw), device=device)[phase]
        # a fixed pseudo-random order of cells spreads a partial phase over the whole grid
        cell_order = torch.randperm(num_cells, generator=torch.Generator().manual_seed(num_cells)).to(device)
        return phase_rank * num_cells + cell_order[cell]

    def select(self, ctx: SelectionContext) -> Tensor:
        return select_by_priority(ctx, self.priority(ctx))
