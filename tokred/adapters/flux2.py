"""The Flux.2 adapter: token reduction on the image tokens of ``Flux2Transformer2DModel``.

Its double blocks are Flux.1's in all that matters here (the joint attention's arguments, its projections, RoPE as
(cos, sin) tables over [text, image]), so they reuse the Flux.1 attention site. Its single blocks differ: the model
concatenates [text, image] once and each block takes and returns that one stream, and their attention fuses the
projections with the MLP (``Flux2ParallelSelfAttention``), so nearly all of a single block runs inside its attention
module. In ``tokens`` mode that module's processor merges the image part of its input, runs on [text, merged image,
reference tokens] (RoPE per sample, merged keys weighed) and unmerges the image part of its output, which the block
adds, gated, to its full residual stream: only the update is unmerged. The grid comes from ``img_ids`` (axes t, h,
w, l; the image being made has t = 0, reference images t = 10, 20, ... follow it and pass untouched).
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
from tokred.adapters.flux import (
    FluxAdapter,
    FluxAttentionSite,
    Rope,
    gather_rope,
    merge_span,
    stream_bias,
    unmerge_span,
)
from tokred.adapters.hooks import GridCell, TokenSiteHook, argument
from tokred.engine import Engine
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo


class Flux2AttentionSite(FluxAttentionSite):
    """A double block's joint attention (Flux.1's site with Flux.2's projections)."""

    projections = staticmethod(_get_qkv_projections)


def _text_len(cell: GridCell, stream_len: int) -> int:
    return stream_len - cell.tokens - cell.extra


class Flux2ParallelSite(AttentionSite):
    """A single block's fused attention + MLP (``Flux2ParallelSelfAttention``), on the block's whole stream
    [text, image, reference tokens].

    ``tokens`` mode: the image grid of its (normalised, modulated) input is merged, the attention and the MLP run on
    [text, merged image, references] with RoPE per sample and merged keys weighed by their sizes, and the image part
    of the output is unmerged — the block adds it, gated, to its full residual stream, so only the update is
    unmerged. ``kv`` mode: the image keys and values are merged after RoPE at full positions.
    """

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
        text_len = _text_len(self.cell, hidden_states.shape[1])
        if self.cell.grid is None or text_len < 0:
            self.plan(hidden_states)  # counted as skipped
            return unchanged()
        tokens = self.cell.tokens
        grid_part = hidden_states[:, text_len : text_len + tokens]
        plan = self.plan(grid_part)
        if plan is None:
            return unchanged()
        if self.mode == "kv":
            return self.attention(original, attn, hidden_states, image_rotary_emb, plan, text_len)
        stream = merge_span(plan, hidden_states, text_len, grid_part)
        rope = gather_rope(image_rotary_emb, text_len, plan.destinations, tokens, self.cell.extra)
        return unmerge_span(plan, self.attention(original, attn, stream, rope, plan, text_len), text_len)

    def attention(
        self, original: Any, attn: torch.nn.Module, hidden: Tensor, rope: Rope, plan: MergePlan, text_len: int
    ) -> Tensor:
        fused = attn.to_qkv_mlp_proj(hidden)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(fused, [local_qkv, fused.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key = rotate(query, *rope), rotate(key, *rope)
        if self.mode == "kv":  # the image grid's keys and values merged, after RoPE at full positions
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
                SiteRule("attn1", "attn", Flux2AttentionSite.modes("tokens", "kv")),
                SiteRule("ff", "ff", {"tokens": TokenSiteHook}),
            ),
        ),
        BlockPattern(
            family="single",
            container="single_transformer_blocks",
            types=(Flux2SingleTransformerBlock,),
            sites=(SiteRule("attn1", "attn", Flux2ParallelSite.modes("tokens", "kv")),),
        ),
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._ids = FluxAdapter(options)  # reads the grid from ids as Flux.1 does (axes 1 and 2 are h and w)

    def attach(self, model: torch.nn.Module, engine: Engine, config: Any) -> list[SiteInfo]:
        self._ids.model = model
        return super().attach(model, engine, config)

    def read_grid(self, args: tuple, kwargs: dict) -> Any:
        return self._ids.read_grid((), {"img_ids": argument(args, kwargs, 3, "img_ids")})

    def read_features(self, args: tuple, kwargs: dict) -> Tensor | None:
        hidden = argument(args, kwargs, 0, "hidden_states")
        return hidden if isinstance(hidden, Tensor) and hidden.dim() == 3 else None
