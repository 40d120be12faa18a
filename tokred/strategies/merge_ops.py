"""Merge ops: how sources fold into destinations (merge) and how destinations spread back (unmerge)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveFloat
from torch import Tensor

from tokred.registry import Options
from tokred.strategies.base import GroupMaps, SelectionContext, one_hot

# Added to a destination's similarity with its own slot so that it is always assigned to itself, even when
# another destination is an exact duplicate (cosine similarities lie in [-1, 1]).
_SELF_BONUS = 4.0


def _masks(ctx: SelectionContext) -> tuple[Tensor, Tensor]:
    """(1, G, d, 1) used destinations and (1, G, 1, n) valid sources."""
    return ctx.destination_valid[None, :, :, None], ctx.layout.valid[None, :, None, :]


def _rows_normalised(assign: Tensor) -> Tensor:
    return assign / assign.sum(-1, keepdim=True).clamp_min(torch.finfo(assign.dtype).tiny)


def hard_assignment(ctx: SelectionContext, destinations: Tensor) -> Tensor:
    """(B, G, n): for each slot, the most similar destination (0..d-1); a destination picks itself."""
    similarity = ctx.destination_similarity(destinations)
    own = one_hot(destinations, ctx.layout.group_size, similarity.dtype)
    scores = similarity.add_(own, alpha=_SELF_BONUS)
    if not ctx.all_destinations_used:
        scores = scores.masked_fill_(~_masks(ctx)[0], float("-inf"))
    return scores.argmax(-2)


class AttentionMerge:
    """ToMA: soft assignment by a softmax over destinations; merge rows normalised, unmerge = transpose."""

    class Options(Options):
        temperature: PositiveFloat = Field(1000.0, description="τ of softmax(τ·⟨x̂_dst, x̂_src⟩); large = nearly hard")
        unmerge: Literal["transpose", "pinv"] = Field(
            "transpose", description="transpose of the assignment, or pseudo-inverse of the merge map"
        )

    def __init__(self, options: AttentionMerge.Options) -> None:
        self.temperature = options.temperature
        self.unmerge = options.unmerge

    def maps(self, ctx: SelectionContext, destinations: Tensor) -> GroupMaps:
        dst_valid, src_valid = _masks(ctx)
        logits = ctx.destination_similarity(destinations).mul_(self.temperature)
        if not ctx.all_destinations_used:
            logits = logits.masked_fill_(~dst_valid, float("-inf"))
        assign = torch.softmax(logits, dim=-2)  # each source: a distribution over destinations
        if not ctx.layout.regular:
            assign = assign.mul_(src_valid)
        # A large temperature leaves many weights subnormal; those slow CPU matmuls ~10x and change nothing.
        assign = assign.masked_fill_(assign < torch.finfo(assign.dtype).tiny, 0.0)
        merge = _rows_normalised(assign)
        # contiguous: a transposed operand takes a slower batched-matmul path on every unmerge
        unmerge = torch.linalg.pinv(merge) if self.unmerge == "pinv" else assign.transpose(-1, -2).contiguous()
        return GroupMaps(merge=merge, unmerge=unmerge, sizes=assign.sum(-1))


class MeanMerge:
    """Hard assignment to the most similar destination; merge = average, unmerge = copy."""

    def __init__(self, options: Options) -> None:
        pass

    def maps(self, ctx: SelectionContext, destinations: Tensor) -> GroupMaps:
        assignment = hard_assignment(ctx, destinations)
        _, src_valid = _masks(ctx)
        onehot = one_hot(assignment, ctx.max_destinations).transpose(-1, -2) * src_valid
        return GroupMaps(merge=_rows_normalised(onehot), unmerge=None, assignment=assignment, sizes=onehot.sum(-1))


class PruneMerge:
    """Keep the destinations as they are; unmerge copies each token's most similar destination."""

    def __init__(self, options: Options) -> None:
        pass

    def maps(self, ctx: SelectionContext, destinations: Tensor) -> GroupMaps:
        assignment = hard_assignment(ctx, destinations)
        _, src_valid = _masks(ctx)
        counts = (one_hot(assignment, ctx.max_destinations).transpose(-1, -2) * src_valid).sum(-1)
        return GroupMaps(merge=None, unmerge=None, assignment=assignment, sizes=counts)
