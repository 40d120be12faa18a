"""The UNet adapter: SDXL, and the SD 1.x/2.x UNets that share its blocks.

Sites are the ``attn1`` (self-attention), ``attn2`` (cross-attention: the query side is reduced) and ``ff`` of
every ``BasicTransformerBlock`` inside a ``Transformer2DModel``. Each ``Transformer2DModel`` is a scope: the grid
of its blocks is read from its (B, C, H, W) input, so it is exact for any size and aspect ratio.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from tokred.adapters.base import Adapter, BlockPattern, Grid, Scope, SiteRule
from tokred.adapters.hooks import TokenSiteHook

tokens_site = functools.partial(TokenSiteHook, mode="tokens")
kv_site = functools.partial(TokenSiteHook, mode="kv")


def spatial_grid(args: tuple, kwargs: dict) -> Grid | None:
    """(H, W) of a (B, C, H, W) ``hidden_states`` input."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
        return int(hidden.shape[-2]), int(hidden.shape[-1])
    return None


def _continuous(module: Any) -> bool:
    return isinstance(module, Transformer2DModel) and bool(module.is_input_continuous)


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
                SiteRule("attn1", "attn1", {"tokens": tokens_site, "kv": kv_site}),
                SiteRule("attn2", "attn2", {"tokens": tokens_site}),
                SiteRule("ff", "ff", {"tokens": tokens_site}),
            ),
        ),
    )

    @classmethod
    def handles(cls, model: Any) -> bool:
        return isinstance(model, UNet2DConditionModel) or _continuous(model)

    def scopes(self, model: torch.nn.Module) -> list[Scope]:
        """Every continuous ``Transformer2DModel`` (one resolution stage each)."""
        return [Scope(module, path, spatial_grid) for path, module in model.named_modules() if _continuous(module)]

    def timestep_arg(self, model: torch.nn.Module) -> tuple[int, str]:
        # UNet2DConditionModel(sample, timestep, ...); Transformer2DModel(hidden_states, encoder_states, timestep)
        return (1, "timestep") if isinstance(model, UNet2DConditionModel) else (2, "timestep")
