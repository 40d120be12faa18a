"""What strategies see and return: group layouts, the selection context, and merge maps.

A **locality** turns a site's h×w token grid into a :class:`GroupLayout` (padded groups with a validity mask,
so every group is processed in one batched tensor). A **selector** reads a :class:`SelectionContext` and
returns, per batch element and group, the slots of its destinations. A **merge op** turns the context and
those destinations into :class:`GroupMaps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """A partition of an h×w grid (row-major tokens) into groups, padded to the largest group.

    Attributes:
        grid: (h, w).
        index: (G, n) token index at each slot of each group; a padded slot repeats a token of its group.
        valid: (G, n) which slots hold a token of their own.
    """

    grid: tuple[int, int]
    index: Tensor
    valid: Tensor

    @classmethod
    def from_group_ids(cls, grid: tuple[int, int], group_of_token: Tensor) -> GroupLayout:
        """Build the layout from each token's group id (ids 0..G-1, every id used)."""
        group_of_token = group_of_token.to(torch.long).cpu()
        num_tokens = grid[0] * grid[1]
        if group_of_token.shape != (num_tokens,):
            raise ValueError(f"need one group id per token ({num_tokens}), got shape {tuple(group_of_token.shape)}")
        num_groups = int(group_of_token.max()) + 1
        counts = torch.bincount(group_of_token, minlength=num_groups)
        if bool((counts == 0).any()):
            raise ValueError("group ids must be contiguous: some group has no token")
        order = torch.argsort(group_of_token, stable=True)  # tokens grouped, row-major inside each group
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(num_tokens) - starts[group_of_token[order]]
        size = int(counts.max())
        index = order[starts].unsqueeze(1).repeat(1, size)  # pad with the group's first token
        index[group_of_token[order], rank] = order
        valid = torch.arange(size).unsqueeze(0) < counts.unsqueeze(1)
        return cls(grid=(int(grid[0]), int(grid[1])), index=index, valid=valid)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_groups(self) -> int:
        return self.index.shape[0]

    @property
    def group_size(self) -> int:
        return self.index.shape[1]

    @cached_property
    def counts(self) -> Tensor:
        """(G,) tokens in each group."""
        return self.valid.sum(1)

    @cached_property
    def regular(self) -> bool:
        """Every group has the same size (no padding)."""
        return bool(self.valid.all())

    @cached_property
    def inverse(self) -> Tensor:
        """(N,) the flat slot (g·n + s) of each token: gathering slots with it restores token order."""
        flat = torch.arange(self.index.numel()).view_as(self.index)
        inverse = torch.empty(self.num_tokens, dtype=torch.long)
        inverse[self.index[self.valid]] = flat[self.valid]
        return inverse

    @cached_property
    def coords(self) -> Tensor:
        """(G, n, 2) the (row, column) of the token at each slot."""
        return torch.stack((self.index // self.grid[1], self.index % self.grid[1]), dim=-1)

    def to(self, device: torch.device | str) -> GroupLayout:
        return GroupLayout(self.grid, self.index.to(device), self.valid.to(device))


def destination_counts(counts: Tensor, ratio: float) -> Tensor:
    """Destinations per group: round(n·(1−ratio)), at least 1 and at most n."""
    kept = torch.round(counts.to(torch.float64) * (1.0 - ratio)).to(torch.long)
    return torch.minimum(kept.clamp_min(1), counts)


class SelectionContext:
    """The tokens of one site, grouped, as selectors and merge ops see them.

    Attributes:
        features: (B, G, n, C) float32, L2-normalised; zero at padded slots.
        layout: the :class:`GroupLayout` (on the features' device).
        num_destinations: (G,) destinations to pick in each group.
        max_destinations: the largest of them (d).
        generator: a seeded ``torch.Generator`` for selectors that draw at random.
    """

    def __init__(
        self,
        features: Tensor,
        layout: GroupLayout,
        num_destinations: Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        self.features = features
        self.layout = layout
        self.num_destinations = num_destinations
        self.max_destinations = int(num_destinations.max())
        self.generator = generator
        self._similarity: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def similarity(self) -> Tensor:
        """(B, G, n, n) cosine similarity of the slots of each group (computed once, on first use)."""
        if self._similarity is None:
            self._similarity = self.features @ self.features.transpose(-1, -2)
        return self._similarity

    @property
    def has_similarity(self) -> bool:
        return self._similarity is not None

    @cached_property
    def destination_valid(self) -> Tensor:
        """(G, d) which of the d destination slots of each group are used."""
        arange = torch.arange(self.max_destinations, device=self.num_destinations.device)
        return arange.unsqueeze(0) < self.num_destinations.unsqueeze(1)

    def destination_similarity(self, destinations: Tensor) -> Tensor:
        """(B, G, d, n) cosine similarity of each destination to every slot of its group."""
        if self._similarity is not None:
            n = self.layout.group_size
            rows = destinations.unsqueeze(-1).expand(-1, -1, -1, n)
            return self._similarity.gather(2, rows)
        channels = self.features.shape[-1]
        picked = self.features.gather(2, destinations.unsqueeze(-1).expand(-1, -1, -1, channels))
        return picked @ self.features.transpose(-1, -2)


def select_by_priority(ctx: SelectionContext, priority: Tensor) -> Tensor:
    """The d slots of lowest priority in each group, skipping padded slots.

    ``priority`` is (B, G, n) or (G, n). Integer priorities break ties by slot order; floating-point ones
    should not tie. Returns (B, G, d) slot indices.
    """
    valid = ctx.layout.valid
    n = ctx.layout.group_size
    if priority.is_floating_point():
        key = priority.to(torch.float64).masked_fill(~valid, float("inf"))
    else:
        slot = torch.arange(n, device=priority.device)
        key = priority.to(torch.long) * n + slot
        key = key.masked_fill(~valid, torch.iinfo(torch.long).max)
    if key.dim() == 2:
        key = key.unsqueeze(0).expand(ctx.batch_size, -1, -1)
    return torch.topk(key, ctx.max_destinations, dim=-1, largest=False).indices


@runtime_checkable
class Selector(Protocol):
    """Picks destination slots: ``select(ctx) -> (B, G, d)`` long tensor.

    For each group g, the first ``ctx.num_destinations[g]`` entries must be distinct valid slots; the rest
    are ignored.
    """

    def select(self, ctx: SelectionContext) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class GroupMaps:
    """How a group's sources map to its destinations, and back.

    Attributes:
        merge: (B, G, d, n) weights (rows sum to 1 on used destinations), or ``None`` to keep the
            destination tokens themselves (a pure copy).
        unmerge: (B, G, n, d) weights (rows sum to 1), or ``None`` to copy from ``assignment``.
        assignment: (B, G, n) the destination (0..d-1) each slot copies on unmerge, when ``unmerge`` is None.
    """

    merge: Tensor | None
    unmerge: Tensor | None
    assignment: Tensor | None = None

    def __post_init__(self) -> None:
        if self.unmerge is None and self.assignment is None:
            raise ValueError("GroupMaps needs either unmerge weights or an assignment")


@runtime_checkable
class MergeOp(Protocol):
    """Builds merge and unmerge maps: ``maps(ctx, destinations) -> GroupMaps``."""

    def maps(self, ctx: SelectionContext, destinations: Tensor) -> GroupMaps: ...


@runtime_checkable
class Locality(Protocol):
    """Partitions an h×w grid into groups: ``partition((h, w)) -> GroupLayout``."""

    def partition(self, grid: tuple[int, int]) -> GroupLayout: ...
