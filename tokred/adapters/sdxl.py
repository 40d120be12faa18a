"""The UNet adapter: SDXL, and the SD 1.x/2.x UNets that share its blocks.

Sites are the ``attn1`` (self-attention), ``attn2`` (cross-attention: the query side is reduced) and ``ff`` of
every ``BasicTransformerBlock`` inside a ``Transformer2DModel``. Each ``Transformer2DModel`` is a scope: the grid
of its blocks is read from its (B, C, H, W) input, so it is exact for any size and aspect ratio.

The attention sites run as processors of their ``Attention`` modules. With diffusers' default processor
(``AttnProcessor2_0``, which calls torch's SDPA itself whatever diffusers backend is active), self-attention on
merged tokens runs here — the module's own projections, SDPA with proportional attention folded into the heads —
so that no mask is needed; any other processor gets the merged tokens (and a mask, when asked for) and runs as it
would.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor

from tokred.adapters.attention import AttentionSite, attend
from tokred.adapters.base import Adapter, BlockPattern, Grid, Scope, SiteRule
from tokred.adapters.hooks import TokenSiteHook, argument, replace_argument
from tokred.plan import MergePlan


def spatial_grid(args: tuple, kwargs: dict) -> Grid | None:
    """(H, W) of a (B, C, H, W) ``hidden_states`` input."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
        return int(hidden.shape[-2]), int(hidden.shape[-1])
    return None


def spatial_tokens(args: tuple, kwargs: dict) -> Tensor | None:
    """A stage's (B, C, H, W) input as (B, H·W, C) tokens: the features of plans built at the stage's entry."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
        return hidden.flatten(2).transpose(1, 2)
    return None


def _continuous(module: Any) -> bool:
    return isinstance(module, Transformer2DModel) and bool(module.is_input_continuous)


def _plain(attn: torch.nn.Module, processor: Any) -> bool:
    """Whether the module's attention is diffusers' default path, which tokred can run itself on merged tokens."""
    return (
        type(processor) is AttnProcessor2_0
        and attn.spatial_norm is None
        and attn.group_norm is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and not getattr(attn, "fused_projections", False)
    )


class UNetAttentionSite(AttentionSite):
    """``attn1`` (tokens or kv mode) or ``attn2`` (tokens mode: its queries) of a ``BasicTransformerBlock``."""

    def process(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        unchanged = hidden_states.dim() != 3 or args or attention_mask is not None
        self_attention = self.site.kind == "attn1"
        if self_attention:
            unchanged = unchanged or encoder_hidden_states is not None  # keys from elsewhere: not these tokens
            unchanged = unchanged or (self.mode == "kv" and not _plain(attn, original))
        else:
            # IP-adapter masks are laid out on the full query grid
            unchanged = unchanged or encoder_hidden_states is None or kwargs.get("ip_adapter_masks") is not None
        plan = None if unchanged else self.plan(hidden_states)
        if plan is None:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        merged = plan.merge(hidden_states)
        if not self_attention:
            return plan.unmerge(original(attn, merged, encoder_hidden_states, None, **kwargs))
        queries = hidden_states if self.mode == "kv" else merged
        if _plain(attn, original):
            out = self.attention(attn, queries, merged, plan)
        else:  # another processor: merged tokens, and the bias as its attention mask when that is the way
            mask = plan.log_sizes(hidden_states.dtype).unsqueeze(1) if self.foreign_way(original) == "mask" else None
            keys = merged if self.mode == "kv" else None
            out = original(attn, queries, keys, mask, **kwargs)
        return out if self.mode == "kv" else plan.unmerge(out)

    # a processor that is a module (the IP-adapter's, on attn2) stays in place: merge its queries from outside
    def hooked_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = argument(args, kwargs, 0, "hidden_states")
        if self.site.kind != "attn2" or self.mode != "tokens" or not isinstance(hidden, Tensor) or hidden.dim() != 3:
            return None
        if argument(args, kwargs, 1, "encoder_hidden_states") is None or kwargs.get("ip_adapter_masks") is not None:
            return None
        plan = self.plan(hidden)
        if plan is None:
            return None
        self._pending = plan
        return replace_argument(args, kwargs, 0, "hidden_states", plan.merge(hidden))

    def hooked_post(self, module: torch.nn.Module, pending: Any, output: Any) -> Any:
        return pending.unmerge(output)

    def attention(self, attn: torch.nn.Module, queries: Tensor, keys: Tensor, plan: MergePlan) -> Tensor:
        """``AttnProcessor2_0``'s self-attention, with merged keys weighed by their sizes."""
        batch = queries.shape[0]
        query, key, value = attn.to_q(queries), attn.to_k(keys), attn.to_v(keys)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        way = self.way(None, head_dim, direct=True)
        bias = plan.log_sizes(queries.dtype) if way != "off" else None
        out = attend(query, key, value, key_bias=bias, way=way, backend="torch-sdpa")
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class UNetAdapter(Adapter):
    """UNet2DConditionModel (SDXL, SD 1.x/2.x) and continuous-input Transformer2DModel."""

    label = "the UNet"
    model_types = (UNet2DConditionModel, Transformer2DModel)
    patterns = (
        BlockPattern(
            family="transformer",
            container="transformer_blocks",
            types=(BasicTransformerBlock,),
            sites=(
                SiteRule("attn1", "attn1", UNetAttentionSite.modes("tokens", "kv")),
                SiteRule("attn2", "attn2", UNetAttentionSite.modes("tokens")),
                SiteRule("ff", "ff", {"tokens": TokenSiteHook}),
            ),
        ),
    )

    @classmethod
    def handles(cls, model: Any) -> bool:
        return isinstance(model, UNet2DConditionModel) or _continuous(model)

    def scopes(self, model: torch.nn.Module) -> list[Scope]:
        """Every continuous ``Transformer2DModel`` (one resolution stage each), in forward order: down blocks,
        the mid block, then up blocks (``named_modules`` lists the up blocks before the mid block)."""
        if isinstance(model, UNet2DConditionModel):
            parts = [("down_blocks", model.down_blocks), ("mid_block", model.mid_block), ("up_blocks", model.up_blocks)]
        else:
            parts = [("", model)]
        scopes = []
        for prefix, part in parts:
            if part is None:
                continue
            for path, module in part.named_modules():
                if _continuous(module):
                    full = ".".join(p for p in (prefix, path) if p)
                    scopes.append(Scope(module, full, spatial_grid, spatial_tokens))
        return scopes

    def timestep_arg(self, model: torch.nn.Module) -> tuple[int, str]:
        # UNet2DConditionModel(sample, timestep, ...); Transformer2DModel(hidden_states, encoder_states, timestep)
        return (1, "timestep") if isinstance(model, UNet2DConditionModel) else (2, "timestep")
