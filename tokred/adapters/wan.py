"""The Wan adapter: token reduction on the video tokens of ``WanTransformer3DModel`` (Wan 2.1 and 2.2).

The tokens lie on a frames × height × width grid after the patch embedding (patch (1, 2, 2)): localities work in 3D
(``tiles`` with a (t, h, w) size, ``stripes`` over rows or over frames). Sites of each block:

- ``attn1``, the self-attention over the video: ``tokens`` mode runs it on merged tokens (RoPE gathered per sample
  at the destinations); ``kv`` mode merges its keys and values after RoPE at full positions;
- ``attn2``, the cross-attention to the text (and, for image-to-video, the image context): its queries are merged,
  its keys — the text — are kept;
- ``ff``, the feed-forward.

Wan calls its blocks and their sub-modules with positional arguments, which the sites rewrite in place. The
self-attention on merged tokens runs as the module's processor (the module's own projections and norms, diffusers'
dispatch with the processor's backend), with proportional attention folded into the heads.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformerBlock, _get_qkv_projections
from torch import Tensor

from tokred.adapters.attention import AttentionSite, active_backend, attend
from tokred.adapters.base import Adapter, BlockPattern, SiteRule
from tokred.adapters.hooks import TokenSiteHook, argument
from tokred.engine import Engine
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo

Rope = tuple[Tensor, Tensor]


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's RoPE on (B, S, H, D): tables (1 or B, S, 1, D) interleaved as diffusers' Wan processor reads them."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def gather_rope(rope: Rope, destinations: Tensor) -> Rope:
    """The (1, N, 1, D) tables at each sample's destinations: (B, D, 1, D_h) (or (1, D, 1, D_h) when shared)."""
    index = destinations.to(rope[0].device)
    return rope[0][0][index], rope[1][0][index]


class WanSelfAttentionSite(AttentionSite):
    """A block's ``attn1``: self-attention over the video tokens."""

    def process(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: Rope | None = None,
        **kwargs: Any,
    ) -> Any:
        def unchanged() -> Any:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        if kwargs or encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            return unchanged()
        if type(original) is not WanAttnProcessor or attn.add_k_proj is not None:
            return unchanged()
        plan = self.plan(hidden_states)
        if plan is None:
            return unchanged()
        if self.mode == "kv":
            return self.attention(original, attn, hidden_states, rotary_emb, plan)
        merged = plan.merge(hidden_states)
        return plan.unmerge(self.attention(original, attn, merged, gather_rope(rotary_emb, plan.destinations), plan))

    def attention(self, original: Any, attn: torch.nn.Module, hidden: Tensor, rope: Rope, plan: MergePlan) -> Tensor:
        query, key, value = _get_qkv_projections(attn, hidden, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = rotate_pairs(query, *rope), rotate_pairs(key, *rope)
        if self.mode == "kv":  # merged after RoPE at full positions; queries stay full
            key, value = (plan.merge(t.flatten(2)).unflatten(-1, t.shape[2:]) for t in (key, value))
        way = self.way(original, query.shape[-1])
        bias = plan.log_sizes(query.dtype) if way != "off" else None
        out = attend(query, key, value, key_bias=bias, way=way, backend=active_backend(original), processor=original)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanAdapter(Adapter):
    """WanTransformer3DModel (Wan 2.1 / 2.2 text- and image-to-video): video tokens of every block."""

    label = "Wan"
    model_types = (WanTransformer3DModel,)
    timestep = (1, "timestep")
    patterns = (
        BlockPattern(
            family="video",
            container="blocks",
            types=(WanTransformerBlock,),
            sites=(
                SiteRule("attn1", "attn1", WanSelfAttentionSite.modes("tokens", "kv")),
                SiteRule("attn2", "attn2", {"tokens": TokenSiteHook}),
                SiteRule("ff", "ffn", {"tokens": TokenSiteHook}),
            ),
        ),
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.patch: tuple[int, int, int] = (1, 2, 2)

    def attach(self, model: torch.nn.Module, engine: Engine, config: Any) -> list[SiteInfo]:
        self.patch = tuple(int(p) for p in model.config.patch_size)  # type: ignore[assignment]
        return super().attach(model, engine, config)

    def read_grid(self, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        hidden = argument(args, kwargs, 0, "hidden_states")
        if not isinstance(hidden, Tensor) or hidden.dim() != 5:
            return None
        pt, ph, pw = self.patch
        return hidden.shape[2] // pt, hidden.shape[3] // ph, hidden.shape[4] // pw

    def read_features(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The video latent's patches as tokens (B, f·h·w, C·pt·ph·pw), in the patch embedding's order."""
        hidden = argument(args, kwargs, 0, "hidden_states")
        if not isinstance(hidden, Tensor) or hidden.dim() != 5:
            return None
        pt, ph, pw = self.patch
        b, c, f, h, w = hidden.shape
        patches = hidden.view(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return patches.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)
