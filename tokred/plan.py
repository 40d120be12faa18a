"""Merge plans: what a site does to its tokens for one input.

A :class:`MergePlan` is immutable. It is built once (destinations chosen, merge and unmerge maps computed) and
then applied any number of times with gathers and batched matrix products only — no sort, no scatter — so its
shapes depend only on (N, grid, config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.strategies.base import (
    Grid,
    GroupLayout,
    GroupMaps,
    Locality,
    MergeOp,
    Quota,
    SelectionContext,
    Selector,
    one_hot,
    take_rows,
)


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Destinations and merge/unmerge maps of one site for one input.

    Attributes:
        grid: (h, w) of the token grid, or (frames, h, w).
        destinations: (B, D) indices of the destination tokens in the original (row-major) order; B may be 1
            when the plan is shared by the whole batch.
        num_tokens: N.
        num_destinations: D.
        sizes: (B, D) float32, how many tokens each destination stands for (sums to N per sample; soft counts
            for soft merges); ``None`` for the identity plan. Adapters add log(sizes) to the attention logits of
            merged keys (proportional attention), so a key standing for m tokens weighs as much as they did.
    """

    grid: Grid
    destinations: Tensor
    layout: GroupLayout | None = None
    merge_weights: Tensor | None = None  # (B, G, d, n), None: keep the destinations (a gather)
    unmerge_weights: Tensor | None = None  # (B, G, n, d), None: copy through unmerge_index
    unmerge_index: Tensor | None = None  # (B, N) destination (0..D-1) each token copies
    dest_slots: Tensor | None = None  # (D,) flat (g·d + k) slot of each destination; None when groups are equal
    slot_dest: Tensor | None = None  # (G·d,) destination of each flat slot; None when groups are equal
    sizes: Tensor | None = None
    _cast: dict[Any, Tensor] = field(default_factory=dict, repr=False)
    #: (tokens, their version, their slots) the plan was built from, for the first merge only: a site merges the
    #: very tokens it built the plan from, whose slot-ordered copy the build already made
    _fresh: list[tuple[Tensor, int, Tensor]] = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_destinations(self) -> int:
        return self.destinations.shape[-1]

    @property
    def is_identity(self) -> bool:
        """Every token is its own destination: merge and unmerge return their input unchanged."""
        return self.layout is None

    def _weights(self, name: str, dtype: torch.dtype) -> Tensor:
        weights = getattr(self, name)
        if weights.dtype == dtype:
            return weights
        key = (name, dtype)
        if key not in self._cast:
            self._cast[key] = weights.to(dtype)
        return self._cast[key]

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C') -> (B, D, C')."""
        self._check(x, self.num_tokens, "merge")
        if self.layout is None:
            return x
        if self.merge_weights is None:
            return take_rows(x, self.destinations)
        fresh = self._fresh.pop() if not torch.compiler.is_compiling() and self._fresh else None
        if fresh is not None and fresh[0] is x and fresh[1] == x._version and fresh[2].dtype == x.dtype:
            slots = fresh[2]
        else:
            slots = self.layout.to_slots(x)
        merged = (self._weights("merge_weights", x.dtype) @ slots).flatten(1, 2)
        return merged if self.dest_slots is None else take_rows(merged, self.dest_slots)

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, D, C') -> (B, N, C')."""
        self._check(y, self.num_destinations, "unmerge")
        if self.layout is None:
            return y
        batch, _, channels = y.shape
        if self.unmerge_weights is None:
            return take_rows(y, self.unmerge_index)
        layout = self.layout
        slots = y if self.slot_dest is None else take_rows(y, self.slot_dest)
        slots = slots.view(batch, layout.num_groups, -1, channels)
        return layout.from_slots(self._weights("unmerge_weights", y.dtype) @ slots)

    def _check(self, x: Tensor, expected: int, what: str) -> None:
        if x.dim() != 3 or x.shape[1] != expected:
            raise ValueError(f"{what} expects (B, {expected}, C), got {tuple(x.shape)}")
        plan_batch = self.destinations.shape[0]
        if plan_batch not in (1, x.shape[0]):
            raise ValueError(f"{what}: the plan was built for batch {plan_batch}, got batch {x.shape[0]}")

    def merge_map(self) -> Tensor:
        """The dense (B, D, N) merge map, float32 (for tests and pictures; merge itself never builds it)."""
        eye = torch.eye(self.num_tokens, device=self.destinations.device)
        return self.merge(eye.expand(self.destinations.shape[0], -1, -1).contiguous())

    def unmerge_map(self) -> Tensor:
        """The dense (B, N, D) unmerge map, float32."""
        eye = torch.eye(self.num_destinations, device=self.destinations.device)
        return self.unmerge(eye.expand(self.destinations.shape[0], -1, -1).contiguous())

    def prepare(self, dtype: torch.dtype) -> MergePlan:
        """Make the casts that applying this plan to ``dtype`` tokens needs now (so applying it only reads); a plan
        prepared for compiled code merges other tokens than it was built from, so it keeps no slots for them."""
        self._fresh.clear()
        for name in ("merge_weights", "unmerge_weights"):
            if getattr(self, name) is not None:
                self._weights(name, dtype)
        if self.sizes is not None:
            self.log_sizes(dtype)
        return self

    def log_sizes(self, dtype: torch.dtype) -> Tensor:
        """(B, D) log(sizes) in ``dtype``: the bias of proportional attention (cached per dtype)."""
        key = ("log_sizes", dtype)
        if key not in self._cast:
            assert self.sizes is not None, "the identity plan has no sizes"
            self._cast[key] = torch.log(self.sizes.clamp_min(1e-6)).to(dtype)
        return self._cast[key]


def identity_plan(grid: Grid, batch: int = 1, device: torch.device | str | None = None) -> MergePlan:
    """The plan of ratio 0: every token is a destination, merge and unmerge return their input."""
    n = math.prod(grid)
    return MergePlan(grid=grid, destinations=torch.arange(n, device=device).expand(batch, n))


def group_tokens(tokens: Tensor, layout: GroupLayout) -> Tensor:
    """(B, N, C) -> (B, G, n, C) float32 features in slot order."""
    return layout.to_slots(tokens).to(torch.float32)


def build_plan(
    tokens: Tensor,
    grid: Grid,
    *,
    selector: Selector,
    merge_op: MergeOp,
    locality: Locality,
    ratio: float,
    generator: torch.Generator | None = None,
    share_batch: bool = False,
    identity_shortcut: bool = True,
    salt: int = 0,
) -> MergePlan:
    """Choose destinations and compute the maps for ``tokens`` (B, N, C) on an h×w ``grid``.

    With ``share_batch`` the destinations are chosen once from batch-pooled features and shared by every
    batch element (for positional tables without a batch dimension); the merge weights stay per sample.
    When every token would be kept, the identity plan is returned, unless ``identity_shortcut`` is False
    (then real maps are built: useful to test the paths that apply them). ``salt`` varies the draws of random
    selectors reproducibly (the engine passes the step).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, C), got shape {tuple(tokens.shape)}")
    grid = tuple(int(v) for v in grid)
    batch, num_tokens, _ = tokens.shape
    if math.prod(grid) != num_tokens:
        shape = "x".join(str(v) for v in grid)
        raise ValueError(f"grid {shape} has {math.prod(grid)} tokens, but tokens has {num_tokens}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must satisfy 0 <= ratio < 1, got {ratio}")
    layout = locality.partition(grid)
    quota = Quota.of(layout, ratio)  # on the CPU: building the plan reads nothing back from the device
    if identity_shortcut and quota.keeps_all:
        return identity_plan(grid, batch, tokens.device)
    layout = layout.to(tokens.device)
    quota = quota.to(tokens.device)
    features = group_tokens(tokens, layout)
    if share_batch and batch > 1:
        pooled = F.normalize(features, dim=-1).mean(0, keepdim=True)
        pooled_ctx = SelectionContext(pooled, layout, quota, generator, salt=salt)
        destinations = selector.select(pooled_ctx).expand(batch, -1, -1)
    else:
        destinations = None
    ctx = SelectionContext(features, layout, quota, generator, salt=salt)
    if destinations is None:
        destinations = selector.select(ctx)
    expected = (batch, layout.num_groups, ctx.max_destinations)
    if tuple(destinations.shape) != expected:
        raise ValueError(f"{type(selector).__name__}.select returned shape {tuple(destinations.shape)}, not {expected}")
    maps = merge_op.maps(ctx, destinations)
    plan = _assemble(grid, layout, ctx, destinations, maps, quota)
    if maps.merge is not None and features.dtype == tokens.dtype:
        plan._fresh.append((tokens, tokens._version, features))
    return plan


def _assemble(
    grid: Grid,
    layout: GroupLayout,
    ctx: SelectionContext,
    destinations: Tensor,
    maps: GroupMaps,
    quota: Quota,
) -> MergePlan:
    batch = destinations.shape[0]
    d = ctx.max_destinations
    dest_slots, slot_dest = quota.used_slots, quota.slot_destination
    token_of_slot = layout.index.unsqueeze(0).expand(batch, -1, -1).gather(2, destinations).flatten(1)
    global_destinations = token_of_slot if dest_slots is None else token_of_slot.index_select(1, dest_slots)
    unmerge_index = None
    if maps.unmerge is None:
        assert maps.assignment is not None
        flat_slot = maps.assignment + (torch.arange(layout.num_groups, device=layout.index.device) * d).view(1, -1, 1)
        dest_of_slot = flat_slot if slot_dest is None else slot_dest[flat_slot]
        unmerge_index = dest_of_slot.flatten(1).index_select(1, layout.inverse)
    if maps.sizes is not None:
        group_sizes = maps.sizes.to(torch.float32)
    elif maps.unmerge is not None:  # a destination stands for the unmerge mass it hands out
        group_sizes = maps.unmerge.to(torch.float32).sum(-2)
    else:
        group_sizes = one_hot(maps.assignment, d)
        group_sizes = (group_sizes * layout.valid.unsqueeze(-1)).sum(-2)
    sizes = group_sizes.flatten(1)
    sizes = sizes if dest_slots is None else sizes.index_select(1, dest_slots)
    return MergePlan(
        grid=grid,
        destinations=global_destinations,
        sizes=sizes,
        layout=layout,
        merge_weights=maps.merge,
        unmerge_weights=maps.unmerge,
        unmerge_index=unmerge_index,
        dest_slots=dest_slots,
        slot_dest=slot_dest,
    )
