"""What strategies see and return: group layouts, the selection context, and merge maps.

A **locality** turns a site's token grid — h×w for images, f×h×w for video — into a :class:`GroupLayout`
(padded groups with a validity mask,
so every group is processed in one batched tensor). A **selector** reads a :class:`SelectionContext` and
returns, per batch element and group, the slots of its destinations. A **merge op** turns the context and
those destinations into :class:`GroupMaps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

Grid = tuple[int, ...]


def as_frames(grid: Grid) -> tuple[int, int, int]:
    """(f, h, w) of an image (h, w) or video (f, h, w) grid; an image is one frame."""
    if len(grid) == 2:
        return 1, int(grid[0]), int(grid[1])
    if len(grid) == 3:
        return int(grid[0]), int(grid[1]), int(grid[2])
    raise ValueError(f"a grid is (h, w) or (frames, h, w), got {grid}")


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """A partition of an h×w (or f×h×w) grid of tokens, in row-major order, into groups padded to the largest.

    Attributes:
        grid: (h, w), or (frames, h, w) for video.
        index: (G, n) token index at each slot of each group; a padded slot repeats a token of its group.
        valid: (G, n) which slots hold a token of their own.
        tile: the tile shape (same length as ``grid``) when the groups are exact tiles numbered row-major.
    """

    grid: Grid
    index: Tensor
    valid: Tensor
    tile: Grid | None = None

    @classmethod
    def from_group_ids(cls, grid: Grid, group_of_token: Tensor, tile: Grid | None = None) -> GroupLayout:
        """Build the layout from each token's group id (ids 0..G-1, every id used).

        ``tile`` declares that the groups are exact tiles numbered row-major (each tile dim divides the grid's):
        slots are then reached by a reshape instead of a gather.
        """
        grid = tuple(int(v) for v in grid)
        as_frames(grid)
        group_of_token = group_of_token.to(torch.long).cpu()
        num_tokens = math.prod(grid)
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
        layout = cls(grid=grid, index=index, valid=valid, tile=tile)
        for name in _DERIVED:  # computed now, so applying a plan never computes them
            getattr(layout, name)
        return layout

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

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
        flat = torch.arange(self.index.numel(), device=self.index.device).view_as(self.index)
        inverse = torch.empty(self.num_tokens, dtype=torch.long, device=self.index.device)
        inverse[self.index[self.valid]] = flat[self.valid]
        return inverse

    @cached_property
    def coords(self) -> Tensor:
        """(G, n, 2) the (row, column) of the token at each slot (within its frame, for video)."""
        _, h, w = as_frames(self.grid)
        within = self.index % (h * w)
        return torch.stack((within // w, within % w), dim=-1)

    @cached_property
    def frames(self) -> Tensor:
        """(G, n) the frame of the token at each slot (0 for images)."""
        _, h, w = as_frames(self.grid)
        return self.index // (h * w)

    @cached_property
    def trivial_order(self) -> bool:
        """Slots already list the tokens in row-major order without padding (one group, or row bands)."""
        in_order = torch.arange(self.num_tokens, device=self.index.device)
        return self.regular and bool((self.index.flatten() == in_order).all())

    @cached_property
    def _on_device(self) -> dict[str, GroupLayout]:
        return {}

    @cached_property
    def _quotas(self) -> dict[float, Quota]:
        return {}

    def to(self, device: torch.device | str) -> GroupLayout:
        """This layout with its tensors on ``device`` (cached: layouts are reused for every plan)."""
        key = str(torch.device(device))
        if key == str(self.index.device):
            return self
        if key not in self._on_device:
            moved = GroupLayout(self.grid, self.index.to(device), self.valid.to(device), self.tile)
            for name in _DERIVED:
                value = getattr(self, name)
                moved.__dict__[name] = value.to(device) if isinstance(value, Tensor) else value
            self._on_device[key] = moved
        return self._on_device[key]

    def to_slots(self, x: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B, G, n, C) in slot order (padded slots repeat a token of their group)."""
        batch, _, channels = x.shape
        if self.trivial_order:
            return x.view(batch, self.num_groups, self.group_size, channels)
        if self.tile is not None:
            (f, h, w), (tf, th, tw) = as_frames(self.grid), as_frames(self.tile)
            tiles = x.view(batch, f // tf, tf, h // th, th, w // tw, tw, channels).permute(0, 1, 3, 5, 2, 4, 6, 7)
            return tiles.reshape(batch, self.num_groups, self.group_size, channels)
        return take_rows(x, self.index.flatten()).view(batch, self.num_groups, self.group_size, channels)

    def from_slots(self, slots: Tensor) -> Tensor:
        """(B, G, n, C) in slot order -> (B, N, C) tokens in row-major order (padded slots dropped)."""
        batch, channels = slots.shape[0], slots.shape[-1]
        if self.trivial_order:
            return slots.reshape(batch, self.num_tokens, channels)
        if self.tile is not None:
            (f, h, w), (tf, th, tw) = as_frames(self.grid), as_frames(self.tile)
            tiles = slots.view(batch, f // tf, h // th, w // tw, tf, th, tw, channels)
            return tiles.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, self.num_tokens, channels)
        return take_rows(slots.reshape(batch, -1, channels), self.inverse)


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x`` (B, N, C) at ``index`` ((K,) shared, or (B or 1, K) per sample) -> (B, K, C).

    One ``index_select`` on dim 0 of the (B·N, C) view: several times faster than ``gather`` or
    ``index_select`` on dim 1 of the 3-D tensor on CPU.
    """
    batch, n, channels = x.shape
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * n
    flat = (index.view(-1, index.shape[-1]) + offsets).flatten()
    return x.reshape(batch * n, channels).index_select(0, flat).view(batch, -1, channels)


_DERIVED = ("counts", "regular", "inverse", "coords", "frames", "trivial_order")


def one_hot(index: Tensor, classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``F.one_hot`` without its check of the index range (a read back from the device on a GPU)."""
    return (index.unsqueeze(-1) == torch.arange(classes, device=index.device)).to(dtype)


def destination_counts(counts: Tensor, ratio: float) -> Tensor:
    """Destinations per group: round(n·(1−ratio)), at least 1 and at most n."""
    kept = torch.round(counts.to(torch.float64) * (1.0 - ratio)).to(torch.long)
    return torch.minimum(kept.clamp_min(1), counts)


@dataclass(frozen=True, eq=False)
class Quota:
    """How many destinations each group of a layout keeps at one ratio, worked out once, on the CPU.

    Everything a plan's shapes depend on is here, so building a plan on a GPU reads nothing back from it.

    Attributes:
        counts: (G,) destinations per group.
        max: the largest count (d).
        valid: (G, d) which destination slots are used.
        all_used: every group keeps d destinations.
        keeps_all: every token is a destination (the identity plan).
        used_slots: (D,) the flat slots (g·d + k) in use, None when all are used.
        slot_destination: (G·d,) the destination (0..D-1) of each flat slot, None when all are used.
    """

    counts: Tensor
    max: int
    valid: Tensor
    all_used: bool
    keeps_all: bool
    used_slots: Tensor | None
    slot_destination: Tensor | None
    _on_device: dict[str, Quota] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, layout: GroupLayout, ratio: float) -> Quota:
        """The quota of ``layout`` at ``ratio`` (cached on the layout, which is itself cached per grid)."""
        cache = layout._quotas
        if ratio not in cache:
            counts = destination_counts(layout.counts.cpu(), ratio)
            most = int(counts.max())
            valid = torch.arange(most).unsqueeze(0) < counts.unsqueeze(1)
            flat = valid.flatten()
            all_used = bool(flat.all())
            cache[ratio] = cls(
                counts=counts,
                max=most,
                valid=valid,
                all_used=all_used,
                keeps_all=bool((counts == layout.counts.cpu()).all()),
                used_slots=None if all_used else flat.nonzero().squeeze(-1),
                slot_destination=None if all_used else (torch.cumsum(flat, 0) - 1).clamp_min(0),
            )
        return cache[ratio]

    def to(self, device: torch.device | str) -> Quota:
        key = str(torch.device(device))
        if key == str(self.counts.device):
            return self
        if key not in self._on_device:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            self._on_device[key] = Quota(
                move(self.counts),
                self.max,
                move(self.valid),
                self.all_used,
                self.keeps_all,
                move(self.used_slots),
                move(self.slot_destination),
            )
        return self._on_device[key]


def _safe_reciprocal(norms: Tensor) -> Tensor:
    return torch.where(norms > 1e-12, norms.reciprocal(), torch.zeros_like(norms))


class SelectionContext:
    """The tokens of one site, grouped, as selectors and merge ops see them.

    Attributes:
        features: (B, G, n, C) float32 token features (not normalised; padded slots repeat a token of
            their group and must be ignored through ``layout.valid``).
        layout: the :class:`GroupLayout` (on the features' device).
        num_destinations: (G,) destinations to pick in each group.
        max_destinations: the largest of them (d).
        generator: a seeded ``torch.Generator`` for selectors that draw at random (on the features' device).
        salt: an integer random selectors mix into their seed when no generator is given (the engine passes
            the denoising step, so rebuilt plans draw anew, reproducibly).
    """

    def __init__(
        self,
        features: Tensor,
        layout: GroupLayout,
        num_destinations: Tensor | Quota,
        generator: torch.Generator | None = None,
        salt: int = 0,
    ) -> None:
        self.features = features
        self.layout = layout
        if isinstance(num_destinations, Quota):  # worked out on the CPU: nothing is read back from the device
            quota = num_destinations
            self.num_destinations = quota.counts
            self.max_destinations = quota.max
            self.__dict__["destination_valid"] = quota.valid
            self.__dict__["all_destinations_used"] = quota.all_used
        else:
            self.num_destinations = num_destinations
            self.max_destinations = int(num_destinations.max())
        self.generator = generator
        self.salt = salt
        self._similarity: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @cached_property
    def inverse_norms(self) -> Tensor:
        """(B, G, n) 1/‖x‖ of each slot (0 for a zero vector)."""
        norms = torch.linalg.vector_norm(self.features, dim=-1)
        return _safe_reciprocal(norms)

    @property
    def similarity(self) -> Tensor:
        """(B, G, n, n) cosine similarity of the slots of each group (computed once, on first use).

        Normalising the n×n product rather than the n×C features costs n/C as much.
        """
        if self._similarity is None:
            gram = self.features @ self.features.transpose(-1, -2)
            if "inverse_norms" not in self.__dict__:  # the diagonal holds the squared norms: no extra pass
                self.__dict__["inverse_norms"] = _safe_reciprocal(gram.diagonal(dim1=-2, dim2=-1).sqrt())
            inv = self.inverse_norms
            self._similarity = gram.mul_(inv.unsqueeze(-1)).mul_(inv.unsqueeze(-2))
        return self._similarity

    @property
    def has_similarity(self) -> bool:
        return self._similarity is not None

    @cached_property
    def destination_valid(self) -> Tensor:
        """(G, d) which of the d destination slots of each group are used."""
        arange = torch.arange(self.max_destinations, device=self.num_destinations.device)
        return arange.unsqueeze(0) < self.num_destinations.unsqueeze(1)

    @cached_property
    def all_destinations_used(self) -> bool:
        return bool(self.destination_valid.all())

    def destination_similarity(self, destinations: Tensor) -> Tensor:
        """(B, G, d, n) cosine similarity of each destination to every slot of its group."""
        if self._similarity is not None:
            n = self.layout.group_size
            rows = destinations.unsqueeze(-1).expand(-1, -1, -1, n)
            return self._similarity.gather(2, rows)
        channels = self.features.shape[-1]
        picked = self.features.gather(2, destinations.unsqueeze(-1).expand(-1, -1, -1, channels))
        inv = self.inverse_norms
        picked_inv = inv.gather(2, destinations)
        gram = picked @ self.features.transpose(-1, -2)
        return gram.mul_(picked_inv.unsqueeze(-1)).mul_(inv.unsqueeze(-2))


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
        sizes: (B, G, d) how many source tokens each destination stands for (soft counts allowed): the
            attention weight its key deserves (proportional attention). None: counted from the maps.
    """

    merge: Tensor | None
    unmerge: Tensor | None
    assignment: Tensor | None = None
    sizes: Tensor | None = None

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

    def partition(self, grid: Grid) -> GroupLayout: ...


@dataclass(frozen=True)
class SiteInfo:
    """What a schedule knows of a site.

    Attributes:
        name: unique name, e.g. the module path of the sub-layer.
        kind: the sub-layer, e.g. ``attn1``, ``attn2``, ``ff``.
        family: the kind of block holding it (``transformer`` in a UNet; ``double`` or ``single`` in Flux).
        block: the index of that block among the blocks of its family, in forward order.
    """

    name: str
    kind: str
    family: str
    block: int


@runtime_checkable
class Schedule(Protocol):
    """Decides when a site merges, when its plan is rebuilt, and which sites share a plan."""

    def merges(self, step: int, site: SiteInfo) -> bool: ...

    def rebuilds(self, step: int, built_at: int | None) -> bool: ...

    def share_key(self, site: SiteInfo, grid: Grid) -> object: ...
