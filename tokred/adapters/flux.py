"""The Flux adapter: token reduction on the image tokens of ``FluxTransformer2DModel``.

Text tokens (any length, read from the inputs) pass untouched. The image grid comes from ``img_ids`` at the
transformer's entry; tokens after the grid that belong to no grid of theirs — the reference image of Flux Kontext,
whose ids start a second grid — pass untouched like text. Sites, by block family:

- ``double`` blocks: ``attn1`` is the joint attention (image Q/K/V merged in ``tokens`` mode; image K/V reduced in
  ``kv`` mode); ``ff`` is the image feed-forward (``tokens`` mode).
- ``single`` blocks (``attn1``): ``tokens`` mode runs the whole block — attention and parallel MLP, output
  projection included — on the merged image tokens and unmerges only the block's update,
  out = x + U·(f(M·x) − M·x), so the residual stream stays exact; ``kv`` mode reduces the image K/V of its
  attention.

The attention runs as the module's processor while a patch is active (the module's own projections and norms,
diffusers' attention dispatch with the processor's backend), because two things need a place between the
projections and the kernel: RoPE per sample — each image picks its own destinations, so its position table is its
own, which diffusers' ``apply_rotary_emb`` (one (S, D) table for the batch) cannot take — and, in ``kv`` mode,
reducing keys and values after RoPE. An IP-adapter processor (a module with weights of its own) is left in place;
around it, merging uses destinations shared by the batch and a mask for proportional attention where the backend
takes one.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,
)
from torch import Tensor

from tokred.adapters.attention import AttentionSite, active_backend, attend, gather_positions, rotate
from tokred.adapters.base import Adapter, BlockPattern, Grid, SiteRule
from tokred.adapters.hooks import GridCell, Site, TokenSiteHook, _forget, argument, foreign_hooks, records
from tokred.engine import Engine
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo

Rope = tuple[Tensor, Tensor]


def context_shards(model: torch.nn.Module | None) -> int:
    """How many ranks diffusers' context parallelism splits the sequence over (1 without it)."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    if config is None:
        return 1
    return int(config.ulysses_degree or 1) * int(config.ring_degree or 1)


def grid_from_ids(img_ids: Tensor | None) -> tuple[Grid, int] | None:
    """((h, w), extra) when the leading rows of ``img_ids`` are (0, row, col) of a full row-major grid; ``extra``
    rows may follow with another first id (a reference image). None otherwise (no merging).

    Everything is worked out on the ids' device and read back at once: one read, however the check goes.
    """
    if not isinstance(img_ids, Tensor):
        return None
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    n = ids.shape[0]
    position = torch.arange(n, device=ids.device)
    first = ids[:, 0] == 0  # the image being generated; a reference image (Kontext) has first id 1
    count = first.sum()
    in_grid = position < count
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    rows = torch.where(in_grid, rows, rows.new_zeros(())) - torch.where(in_grid, rows, rows.max()).min()
    cols = torch.where(in_grid, cols, cols.new_zeros(())) - torch.where(in_grid, cols, cols.max()).min()
    h, w = rows.max() + 1, cols.max() + 1
    row_major = torch.where(in_grid, rows * w + cols == position, True).all()
    leading = (first == in_grid).all()
    count, h, w, ok = torch.stack((count, h, w, (row_major & leading & (h * w == count)).long())).tolist()
    return ((h, w), n - count) if ok and count > 0 else None


def stream_positions(text_len: int, destinations: Tensor, grid_tokens: int, extra: int) -> Tensor:
    """Indices into a [text, image grid, extra] position table of the merged stream [text, destinations, extra]:
    (B, L + D + E), or (L + D + E,) for destinations shared by the batch ((1, D))."""
    device = destinations.device
    text = torch.arange(text_len, device=device)
    tail = torch.arange(extra, device=device) + text_len + grid_tokens
    if destinations.shape[0] == 1:
        return torch.cat((text, destinations[0] + text_len, tail))
    batch = destinations.shape[0]
    return torch.cat((text.expand(batch, -1), destinations + text_len, tail.expand(batch, -1)), dim=1)


def gather_rope(rope: Rope, text_len: int, destinations: Tensor, grid_tokens: int = 0, extra: int = 0) -> Rope:
    """(cos, sin) of the merged stream: text positions, then those of the destinations, then the extra tokens'."""
    grid_tokens = grid_tokens or int(rope[0].shape[0]) - text_len - extra
    index = stream_positions(text_len, destinations, grid_tokens, extra)
    return gather_positions(rope[0], index), gather_positions(rope[1], index)


def stream_bias(plan: MergePlan, text_len: int, extra: int, dtype: torch.dtype) -> Tensor:
    """(B, L + D + E): 0 on text and extra keys, log(size) on the merged image keys."""
    sizes = plan.log_sizes(dtype)
    parts = [sizes.new_zeros(sizes.shape[0], text_len), sizes]
    if extra:
        parts.append(sizes.new_zeros(sizes.shape[0], extra))
    return torch.cat(parts, dim=1)


def project(
    attn: torch.nn.Module, hidden: Tensor, text: Tensor | None, projections: Any = _get_qkv_projections
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V (B, S, H, D) as diffusers' Flux processors make them: text first when the block has a text stream."""
    query, key, value, e_query, e_key, e_value = projections(attn, hidden, text)
    query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.added_kv_proj_dim is not None and text is not None:
        e_query, e_key, e_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (e_query, e_key, e_value))
        e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((e_query, query), (e_key, key), (e_value, value)))
    return query, key, value


def finish(attn: torch.nn.Module, out: Tensor, text: Tensor | None, dtype: torch.dtype) -> Any:
    out = out.flatten(2, 3).to(dtype)
    if text is None:
        return out
    text_out, image_out = out.split_with_sizes([text.shape[1], out.shape[1] - text.shape[1]], dim=1)
    return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())


def merge_span(plan: MergePlan, stream: Tensor, start: int, grid_part: Tensor) -> Tensor:
    """A stream [before, grid tokens, after] with its grid tokens (``grid_part``, the slice at ``start`` that the
    plan was built from) merged."""
    end = start + grid_part.shape[1]
    return torch.cat((stream[:, :start], plan.merge(grid_part), stream[:, end:]), dim=1)


def unmerge_span(plan: MergePlan, stream: Tensor, start: int) -> Tensor:
    """The inverse layout of :func:`merge_span`: the plan's destinations at ``start`` unmerged, the rest kept."""
    end = start + plan.num_destinations
    return torch.cat((stream[:, :start], plan.unmerge(stream[:, start:end]), stream[:, end:]), dim=1)


def unmerge_stream(plan: MergePlan, image: Tensor) -> Tensor:
    """(B, D + E, C) -> (B, N + E, C): the merged part unmerged, extra tokens as they are."""
    restored = plan.unmerge(image[:, : plan.num_destinations])
    extra = image[:, plan.num_destinations :]
    return torch.cat((restored, extra), dim=1) if extra.shape[1] else restored


class FluxAttentionSite(AttentionSite):
    """A Flux attention: the joint attention of a double block (``tokens`` or ``kv`` mode) or a single block's
    attention (``kv`` mode; in ``tokens`` mode it serves the enclosing :class:`FluxSingleBlockSite`)."""

    #: diffusers' Q/K/V projection helper of the family (Flux.2 has its own, with the same contract)
    projections = staticmethod(_get_qkv_projections)

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell, mode: str = "tokens", inner: bool = False):
        super().__init__(engine, site, cell, mode)
        self.inner = inner
        self.outer: tuple[MergePlan, int] | None = None  # set by the enclosing single-block site for one call

    def process(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Rope | None = None,
        **kwargs: Any,
    ) -> Any:
        def unchanged() -> Any:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)

        if kwargs or attention_mask is not None or image_rotary_emb is None:
            return unchanged()
        if self.cell.grid is None and not self.inner:
            self.plan(hidden_states)  # counted as skipped: the image tokens are no grid
            return unchanged()
        if self.inner:  # a single block's attention: its stream is [text, image, extra]
            if self.outer is not None:  # merged by the enclosing block site
                plan, text_len = self.outer
                rope = gather_rope(image_rotary_emb, text_len, plan.destinations, self.cell.tokens, self.cell.extra)
                return self.attention(original, attn, hidden_states, None, rope, plan, text_len)
            return self.merged_single(original, attn, hidden_states, image_rotary_emb, unchanged)
        text = encoder_hidden_states
        if self.mode == "kv":
            return self.reduced_kv(original, attn, hidden_states, text, image_rotary_emb, unchanged)
        if text is None:
            return unchanged()
        grid_part, extra = self.split(hidden_states)
        plan = self.plan(grid_part)
        if plan is None:
            return unchanged()
        merged = plan.merge(grid_part)
        stream = merged if extra is None else torch.cat((merged, extra), dim=1)
        rope = gather_rope(image_rotary_emb, text.shape[1], plan.destinations, grid_part.shape[1], self.cell.extra)
        image_out, text_out = self.attention(original, attn, stream, text, rope, plan, text.shape[1])
        return unmerge_stream(plan, image_out), text_out

    def merged_single(self, original: Any, attn: torch.nn.Module, hidden: Tensor, rope: Rope, unchanged: Any) -> Any:
        """A single block's attention merging and unmerging within its own call (a cache hook sits on it)."""
        tokens, extra = self.cell.tokens, self.cell.extra
        text_len = hidden.shape[1] - tokens - extra
        if self.cell.grid is None or text_len < 0:
            return unchanged()
        grid_part = hidden[:, text_len : text_len + tokens]
        plan = self.plan(grid_part)
        if plan is None:
            return unchanged()
        stream = merge_span(plan, hidden, text_len, grid_part)
        rope = gather_rope(rope, text_len, plan.destinations, tokens, extra)
        return unmerge_span(plan, self.attention(original, attn, stream, None, rope, plan, text_len), text_len)

    def attention(
        self,
        original: Any,
        attn: torch.nn.Module,
        stream: Tensor,
        text: Tensor | None,
        rope: Rope,
        plan: MergePlan,
        text_len: int,
    ) -> Any:
        """Attention over [text, merged image, extra] with per-sample RoPE and merged keys weighed by their sizes."""
        query, key, value = project(attn, stream, text, self.projections)
        query, key = rotate(query, *rope), rotate(key, *rope)
        way = self.way(original, attn.head_dim)
        bias = stream_bias(plan, text_len, self.cell.extra, query.dtype) if way != "off" else None
        out = attend(query, key, value, key_bias=bias, way=way, backend=active_backend(original), processor=original)
        return finish(attn, out, text, query.dtype)

    def reduced_kv(
        self, original: Any, attn: torch.nn.Module, hidden: Tensor, text: Tensor | None, rope: Rope, unchanged: Any
    ) -> Any:
        """Full queries; image keys and values merged after RoPE at full positions."""
        grid_tokens, extra = self.cell.tokens, self.cell.extra
        image_len = grid_tokens + extra
        joint = text is None  # a single block's attention sees [text, image]
        if hidden.shape[1] < image_len or (not joint and hidden.shape[1] != image_len):
            return unchanged()
        start = hidden.shape[1] - image_len if joint else 0
        plan = self.plan(hidden[:, start : start + grid_tokens])
        if plan is None:
            return unchanged()
        query, key, value = project(attn, hidden, text, self.projections)
        query, key = rotate(query, *rope), rotate(key, *rope)
        text_len = key.shape[1] - image_len

        def reduce(t: Tensor) -> Tensor:  # (B, L+N+E, H, d) -> (B, L+D+E, H, d): the grid part merged
            grid = t[:, text_len : text_len + grid_tokens]
            merged = plan.merge(grid.flatten(2)).unflatten(-1, t.shape[2:])
            return torch.cat((t[:, :text_len], merged, t[:, text_len + grid_tokens :]), dim=1)

        key, value = reduce(key), reduce(value)
        way = self.way(original, attn.head_dim)
        bias = stream_bias(plan, text_len, extra, query.dtype) if way != "off" else None
        out = attend(query, key, value, key_bias=bias, way=way, backend=active_backend(original), processor=original)
        return finish(attn, out, text, query.dtype)

    # an IP-adapter processor stays in place: merge around it, with destinations shared by the batch
    def hooked_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden, text = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        rope = kwargs.get("image_rotary_emb")
        if self.mode != "tokens" or args or not isinstance(text, Tensor) or rope is None or self.cell.grid is None:
            return None
        if kwargs.get("attention_mask") is not None:
            return None
        grid_part, extra = self.split(hidden)
        plan = self.plan(grid_part, share_batch=True)
        if plan is None:
            return None
        merged = plan.merge(grid_part)
        stream = merged if extra is None else torch.cat((merged, extra), dim=1)
        shared = plan.destinations[:1]
        kwargs = {
            **kwargs,
            "hidden_states": stream,
            "image_rotary_emb": gather_rope(rope, text.shape[1], shared, grid_part.shape[1], self.cell.extra),
        }
        if self.foreign_way(module.processor) == "mask":
            bias = stream_bias(plan, text.shape[1], self.cell.extra, hidden.dtype)
            kwargs["attention_mask"] = bias[:, None, None, :]
        self._pending = plan
        return args, kwargs

    def hooked_post(self, module: torch.nn.Module, pending: Any, output: Any) -> Any:
        image, text, *rest = output  # (image, text) or (image, text, ip-adapter output on the image)
        return (unmerge_stream(pending, image), text, *(unmerge_stream(pending, r) for r in rest))


class FluxSingleBlockSite(Site):
    """A single block in ``tokens`` mode: attention and parallel MLP on the merged image tokens, only the block's
    update unmerged — out = x + gate·U(f(M·n(x))), n the block's norm.

    It works through the block's own sub-modules, so that a cache that skips the block skips tokred with it: a hook
    after ``norm`` merges the image part of its output, the attention's processor (a :class:`FluxAttentionSite`
    serving this site) applies RoPE per sample and weighs merged keys, and a hook after ``proj_out`` unmerges the
    image part of the update, which the block then gates and adds to its full residual stream. When a cache hook
    sits on the attention itself (pyramid attention broadcast, TaylorSeer, FasterCache), whose cached outputs must
    keep one shape, the attention merges and unmerges inside its own call instead (the MLP then runs in full).
    """

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell) -> None:
        super().__init__(engine, site, cell)
        inner = SiteInfo(f"{site.name}.attn", "attn1", site.family, site.block)
        self.attention = FluxAttentionSite(engine, inner, cell, inner=True)
        # compiled blocks: only the block site's plan is prepared, and the attention uses it when it merges on its
        # own (a cache hook on the attention)
        cell.slots.remove(self.attention.slot)
        self.attention.slot = self.slot
        self.handles: tuple[Any, ...] = ()
        self.block: torch.nn.Module | None = None
        self._pending: tuple[MergePlan, int] | None = None

    def register(self, module: torch.nn.Module) -> None:
        if self.name in records(module):
            raise ValueError(f"{type(module).__name__} already has a {self.name} hook")
        self.block = module
        self.handles = (
            module.norm.register_forward_hook(self._after_norm),
            module.proj_out.register_forward_hook(self._after_update),
        )
        self.attention.register(module.attn)
        records(module)[self.name] = self

    def remove(self, module: torch.nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.attention.remove(module.attn)
        _forget(module, self.name)

    def in_place(self, module: torch.nn.Module) -> bool:
        return self.handles[0].id in module.norm._forward_hooks and self.attention.in_place(module.attn)

    def _after_norm(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        self._pending = None
        self.attention.outer = None
        if not isinstance(output, tuple) or self.attention.processor is None or foreign_hooks(self.block.attn):
            return None  # (a cache on the attention: it merges inside its own call)
        normed, gate = output
        text_len = normed.shape[1] - self.cell.tokens - self.cell.extra
        if self.cell.grid is None or text_len < 0:
            self.plan(normed)  # counted as skipped
            return None
        grid_part = normed[:, text_len : text_len + self.cell.tokens]
        plan = self.plan(grid_part)
        if plan is None:
            return None
        stream = merge_span(plan, normed, text_len, grid_part)
        self._pending = (plan, text_len)
        self.attention.outer = (plan, text_len)
        return stream, gate

    def _after_update(self, module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        pending, self._pending = self._pending, None
        self.attention.outer = None
        if pending is None:
            return None
        plan, text_len = pending
        return unmerge_span(plan, output, text_len)


class FluxAdapter(Adapter):
    """FluxTransformer2DModel (FLUX.1 dev/schnell layout and its variants): double and single blocks, image tokens."""

    label = "Flux"
    model_types = (FluxTransformer2DModel,)
    timestep = (3, "timestep")
    patterns = (
        BlockPattern(
            family="double",
            container="transformer_blocks",
            types=(FluxTransformerBlock,),
            sites=(
                SiteRule("attn1", "attn", FluxAttentionSite.modes("tokens", "kv")),
                SiteRule("ff", "ff", {"tokens": TokenSiteHook}),
            ),
        ),
        BlockPattern(
            family="single",
            container="single_transformer_blocks",
            types=(FluxSingleTransformerBlock,),
            sites=(
                SiteRule("attn1", "", {"tokens": FluxSingleBlockSite}),
                SiteRule("attn1", "attn", FluxAttentionSite.modes("kv")),
            ),
        ),
    )

    ids_index = 4  # position of img_ids in the model's forward

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._grids: list[tuple[weakref.ref, int, Any]] = []
        self.model: torch.nn.Module | None = None

    def attach(self, model: torch.nn.Module, engine: Engine, config: Any) -> list[SiteInfo]:
        self.model = model
        return super().attach(model, engine, config)

    def read_grid(self, args: tuple, kwargs: dict) -> Any:
        """The grid of ``img_ids``, read once per ids tensor (and its in-place version): pipelines pass the same
        tensor at every step, so later steps read nothing back from the device.

        Under diffusers' context parallelism the image tokens are split along the sequence across P ranks after
        this point: each rank's sites see h/P whole rows, and merge within them (tiles never cross a shard). When
        the rows do not split evenly, or a reference image follows the grid, nothing merges.
        """
        ids = argument(args, kwargs, self.ids_index, "img_ids")
        if not isinstance(ids, Tensor):
            return None
        for ref, version, grid in self._grids:
            if ref() is ids and version == ids._version:
                return self._shard(grid)
        grid = grid_from_ids(ids)
        self._grids = [entry for entry in self._grids[-3:] if entry[0]() is not None] + [
            (weakref.ref(ids), ids._version, grid)
        ]
        return self._shard(grid)

    def _shard(self, read: Any) -> Any:
        shards = context_shards(self.model)
        if read is None or shards == 1:
            return read
        (h, w), extra = read
        if extra or h % shards:
            return None
        return (h // shards, w), 0

    def read_features(self, args: tuple, kwargs: dict) -> Tensor | None:
        hidden = argument(args, kwargs, 0, "hidden_states")
        return hidden if isinstance(hidden, Tensor) and hidden.dim() == 3 else None
