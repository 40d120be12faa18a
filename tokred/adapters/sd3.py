"""The SD3 / SD3.5 adapter: token reduction on the image tokens of ``SD3Transformer2DModel``.

Joint (MMDiT) blocks hold the sites: ``attn1`` is the joint attention (``attn``) and, in SD3.5's dual-attention
blocks, the second, image-only self-attention (``attn2``); ``ff`` is the image feed-forward. There is no RoPE —
positions are added once, at the patch embedding — so merged tokens need no position handling. The grid is the
input latent's height and width divided by the patch size.

diffusers' processor for these modules (``JointAttnProcessor2_0``) calls torch's SDPA itself and ignores any
attention mask, so the attention on merged tokens runs here (the module's own projections and norms; image tokens
first, then text, as diffusers orders them), with proportional attention folded into the heads.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import Tensor

from tokred.adapters.attention import DIRECT, AttentionSite, attend
from tokred.adapters.base import Adapter, BlockPattern, Grid, SiteRule
from tokred.adapters.hooks import TokenSiteHook, argument
from tokred.engine import Engine
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo


def _heads(attn: torch.nn.Module, t: Tensor, batch: int) -> Tensor:
    return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads)


class SD3AttentionSite(AttentionSite):
    """The joint attention of a block (image + text) or its image-only second attention (SD3.5)."""

    def process(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        def unchanged() -> Any:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        if args or kwargs or attention_mask is not None or hidden_states.dim() != 3:
            return unchanged()
        if type(original) is not JointAttnProcessor2_0 or getattr(attn, "fused_projections", False):
            return unchanged()  # another processor (IP-adapter, fused projections): its own math, not merged here
        plan = self.plan(hidden_states)
        if plan is None:
            return unchanged()
        if self.mode == "kv":
            return self.attention(attn, hidden_states, encoder_hidden_states, plan, reduce_keys=True)
        out = self.attention(attn, plan.merge(hidden_states), encoder_hidden_states, plan, reduce_keys=False)
        if isinstance(out, tuple):
            return plan.unmerge(out[0]), out[1]
        return plan.unmerge(out)

    def attention(
        self, attn: torch.nn.Module, image: Tensor, text: Tensor | None, plan: MergePlan, reduce_keys: bool
    ) -> Any:
        """``JointAttnProcessor2_0``'s attention over [image, text], with merged image keys weighed by their sizes
        (``reduce_keys``: the image keys and values are merged here, the queries stay full)."""
        batch = image.shape[0]
        query, key, value = (_heads(attn, proj(image), batch) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if reduce_keys:
            key, value = (plan.merge(t.flatten(2)).unflatten(-1, t.shape[2:]) for t in (key, value))
        if text is not None:
            t_query, t_key, t_value = (
                _heads(attn, proj(text), batch) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                t_query = attn.norm_added_q(t_query)
            if attn.norm_added_k is not None:
                t_key = attn.norm_added_k(t_key)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, t_query), (key, t_key), (value, t_value)))
        way = self.way(None, query.shape[-1], direct=True)
        bias = None
        if way != "off":
            sizes = plan.log_sizes(query.dtype)
            bias = torch.cat((sizes, sizes.new_zeros(batch, key.shape[1] - sizes.shape[1])), dim=1)
        out = attend(query, key, value, key_bias=bias, way=way, backend=DIRECT).flatten(2).to(query.dtype)
        image_len = out.shape[1] - (text.shape[1] if text is not None else 0)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :image_len]))
        if text is None:
            return image_out
        text_out = out[:, image_len:]
        return image_out, text_out if attn.context_pre_only else attn.to_add_out(text_out)


class SD3Adapter(Adapter):
    """SD3Transformer2DModel (SD3, SD3.5 medium and large): joint blocks, image tokens only."""

    label = "SD3"
    model_types = (SD3Transformer2DModel,)
    timestep = (3, "timestep")
    patterns = (
        BlockPattern(
            family="joint",
            container="transformer_blocks",
            types=(JointTransformerBlock,),
            sites=(
                SiteRule("attn1", "attn", SD3AttentionSite.modes("tokens", "kv")),
                SiteRule("attn1", "attn2", SD3AttentionSite.modes("tokens", "kv")),
                SiteRule("ff", "ff", {"tokens": TokenSiteHook}),
            ),
        ),
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.patch = 2

    def attach(self, model: torch.nn.Module, engine: Engine, config: Any) -> list[SiteInfo]:
        self.patch = int(model.config.patch_size)
        return super().attach(model, engine, config)

    def read_grid(self, args: tuple, kwargs: dict) -> Grid | None:
        hidden = argument(args, kwargs, 0, "hidden_states")
        if not isinstance(hidden, Tensor) or hidden.dim() != 4:
            return None
        return hidden.shape[-2] // self.patch, hidden.shape[-1] // self.patch

    def read_features(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The latent's patches as tokens (B, h·w, C·p²), row-major like the patch embedding's output."""
        hidden = argument(args, kwargs, 0, "hidden_states")
        if not isinstance(hidden, Tensor) or hidden.dim() != 4:
            return None
        p = self.patch
        batch, channels, height, width = hidden.shape
        patches = hidden.view(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(batch, (height // p) * (width // p), channels * p * p)
