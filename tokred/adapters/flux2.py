"""The Flux.2 adapter: token reduction on the image tokens of ``Flux2Transformer2DModel``.

Its double blocks are Flux.1's in all that matters here (the joint attention's arguments, its projections, RoPE as
(cos, sin) tables over [text, image]), so they reuse the Flux.1 attention site. Its single blocks differ: the model
concatenates [text, image] once and each block takes and returns that one stream, and their attention fuses the
projections with the MLP (``Flux2ParallelSelfAttention``). In ``tokens`` mode a single block runs whole on
[text, merged image, reference tokens] and only the image update is unmerged; its attention's processor applies
RoPE per sample and weighs merged keys. The grid comes from ``img_ids`` (axes t, h, w, l; the image being made has
t = 0, reference images t = 10, 20, ... follow it and pass untouched).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2SingleTransformerBlock,
    Flux2TransformerBlock,
    _get_qkv_projections,
)
from torch import Tensor

from tokred.adapters.attention import AttentionSite, active_backend, attend, rotate
from tokred.adapters.base import Adapter, BlockPattern, SiteRule
from tokred.adapters.flux import FluxAdapter, FluxAttentionSite, Rope, gather_rope, stream_bias
from tokred.adapters.hooks import GridCell, ModuleSite, TokenSiteHook, argument
from tokred.engine import Engine
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo


class Flux2AttentionSite(FluxAttentionSite):
    """A double block's joint attention (Flux.1's site with Flux.2's projections)."""

    projections = staticmethod(_get_qkv_projections)


def _text_len(cell: GridCell, stream_len: int) -> int:
    return stream_len - cell.tokens - cell.extra


class Flux2ParallelSite(AttentionSite):
    """A single block's fused attention + MLP (``Flux2ParallelSelfAttention``): ``kv`` mode reduces its image keys
    and values after RoPE; in ``tokens`` mode it serves the enclosing :class:`Flux2SingleBlockSite` (RoPE per sample,
    merged keys weighed by their sizes)."""

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell, mode: str = "tokens", inner: bool = False):
        super().__init__(engine, site, cell, mode)
        self.inner = inner
        self.outer: tuple[MergePlan, int] | None = None

    def process(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Rope | None = None,
        **kwargs: Any,
    ) -> Any:
        def unchanged() -> Any:
            return original(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)

        if kwargs or attention_mask is not None or image_rotary_emb is None:
            return unchanged()
        if self.inner:
            if self.outer is None:
                return unchanged()
            plan, text_len = self.outer
            return self.attention(original, attn, hidden_states, image_rotary_emb, plan, text_len, reduce=False)
        text_len = _text_len(self.cell, hidden_states.shape[1])
        if self.cell.grid is None or text_len < 0:
            self.plan(hidden_states)  # counted as skipped
            return unchanged()
        plan = self.plan(hidden_states[:, text_len : text_len + self.cell.tokens])
        if plan is None:
            return unchanged()
        return self.attention(original, attn, hidden_states, image_rotary_emb, plan, text_len, reduce=True)

    def attention(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden: Tensor,
        rope: Rope,
        plan: MergePlan,
        text_len: int,
        reduce: bool,
    ) -> Tensor:
        fused = attn.to_qkv_mlp_proj(hidden)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(fused, [local_qkv, fused.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key = rotate(query, *rope), rotate(key, *rope)
        if reduce:  # kv mode: the image grid's keys and values merged, after RoPE at full positions
            tokens = self.cell.tokens

            def merged(t: Tensor) -> Tensor:
                grid = plan.merge(t[:, text_len : text_len + tokens].flatten(2)).unflatten(-1, t.shape[2:])
                return torch.cat((t[:, :text_len], grid, t[:, text_len + tokens :]), dim=1)

            key, value = merged(key), merged(value)
        way = self.way(original, attn.head_dim)
        bias = stream_bias(plan, text_len, self.cell.extra, query.dtype) if way != "off" else None
        out = attend(query, key, value, key_bias=bias, way=way, backend=active_backend(original), processor=original)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat((out, attn.mlp_act_fn(mlp)), dim=-1))


class Flux2SingleBlockSite(ModuleSite):
    """A whole single block in ``tokens`` mode on [text, merged image, reference tokens]; only the image update is
    unmerged: image = x + U·(f(M·x) − M·x)."""

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell) -> None:
        super().__init__(engine, site, cell)
        self.attention = Flux2ParallelSite(
            engine, SiteInfo(f"{site.name}.attn", "attn1", site.family, site.block), cell
        )
        self.attention.inner = True
        cell.slots.remove(self.attention.slot)
        self._pending: Any = None

    def register(self, module: torch.nn.Module) -> None:
        super().register(module)
        self.attention.register(module.attn)

    def remove(self, module: torch.nn.Module) -> None:
        self.attention.remove(module.attn)
        super().remove(module)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self._pending = None
        self.attention.outer = None
        hidden, rope = kwargs.get("hidden_states"), kwargs.get("image_rotary_emb")
        if args or not isinstance(hidden, Tensor) or rope is None or kwargs.get("encoder_hidden_states") is not None:
            return args, kwargs  # a call this site does not know: runs unchanged
        if kwargs.get("split_hidden_states") or self.attention.processor is None:
            return args, kwargs
        text_len = _text_len(self.cell, hidden.shape[1])
        if self.cell.grid is None or text_len < 0:
            self.plan(hidden)  # counted as skipped
            return args, kwargs
        tokens = self.cell.tokens
        grid_part = hidden[:, text_len : text_len + tokens]
        plan = self.plan(grid_part)
        if plan is None:
            return args, kwargs
        merged = plan.merge(grid_part)
        stream = torch.cat((hidden[:, :text_len], merged, hidden[:, text_len + tokens :]), dim=1)
        self._pending = (plan, grid_part, merged, text_len)
        self.attention.outer = (plan, text_len)
        rope = gather_rope(rope, text_len, plan.destinations, tokens, self.cell.extra)
        return args, {**kwargs, "hidden_states": stream, "image_rotary_emb": rope}

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        pending, self._pending = self._pending, None
        self.attention.outer = None
        if pending is None:
            return output
        plan, grid_part, merged, text_len = pending
        d = plan.num_destinations
        image = grid_part + plan.unmerge(output[:, text_len : text_len + d] - merged)
        if image.dtype == torch.float16:
            image = image.clip(-65504, 65504)
        return torch.cat((output[:, :text_len], image, output[:, text_len + d :]), dim=1)


def _double(mode: str):  # type: ignore[no-untyped-def]
    def build(engine: Engine, site: SiteInfo, cell: GridCell) -> Flux2AttentionSite:
        return Flux2AttentionSite(engine, site, cell, mode)

    return build


def _single_kv(engine: Engine, site: SiteInfo, cell: GridCell) -> Flux2ParallelSite:
    return Flux2ParallelSite(engine, site, cell, "kv")


class Flux2Adapter(Adapter):
    """Flux2Transformer2DModel (FLUX.2 dev and Klein): double and single blocks, image tokens only."""

    label = "Flux.2"
    model_types = (Flux2Transformer2DModel,)
    timestep = (2, "timestep")
    patterns = (
        BlockPattern(
            family="double",
            container="transformer_blocks",
            types=(Flux2TransformerBlock,),
            sites=(
                SiteRule("attn1", "attn", {"tokens": _double("tokens"), "kv": _double("kv")}),
                SiteRule("ff", "ff", {"tokens": TokenSiteHook}),
            ),
        ),
        BlockPattern(
            family="single",
            container="single_transformer_blocks",
            types=(Flux2SingleTransformerBlock,),
            sites=(
                SiteRule("attn1", "", {"tokens": Flux2SingleBlockSite}),
                SiteRule("attn1", "attn", {"kv": _single_kv}),
            ),
        ),
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._ids = FluxAdapter(options)  # reads the grid from ids as Flux.1 does (axes 1 and 2 are h and w)

    def read_grid(self, args: tuple, kwargs: dict) -> Any:
        return self._ids.read_grid((), {"img_ids": argument(args, kwargs, 3, "img_ids")})

    def read_features(self, args: tuple, kwargs: dict) -> Tensor | None:
        hidden = argument(args, kwargs, 0, "hidden_states")
        return hidden if isinstance(hidden, Tensor) and hidden.dim() == 3 else None
