"""The UNet adapter: SDXL, and the SD 1.x/2.x UNets that share its blocks.

Sites are the ``attn1`` (self-attention), ``attn2`` (cross-attention: the query side is reduced) and ``ff`` of
every ``BasicTransformerBlock`` inside a ``Transformer2DModel``. The grid of each block is read from its
``Transformer2DModel``'s (B, C, H, W) input, so it is exact for any size and aspect ratio.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from tokred.adapters.hooks import GridCell, GridHook, StepHook, TokenSiteHook
from tokred.config import RunConfig
from tokred.engine import Engine
from tokred.errors import ConfigError, ConfigIssue
from tokred.registry import Options
from tokred.strategies.base import SiteInfo

FAMILY = "transformer"


def _spatial_grid(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
        return int(hidden.shape[-2]), int(hidden.shape[-1])
    return None


def handles(model: Any) -> bool:
    if isinstance(model, UNet2DConditionModel):
        return True
    return isinstance(model, Transformer2DModel) and bool(model.is_input_continuous)


class UNetAdapter:
    """UNet2DConditionModel (SDXL, SD 1.x/2.x) and continuous-input Transformer2DModel."""

    def __init__(self, options: Options) -> None:
        pass

    def check(self, config: RunConfig) -> None:
        if config.mode == "kv":
            others = [site for site in config.sites if site != "attn1"]
            if others:
                raise ConfigError(
                    [
                        ConfigIssue(
                            "sites",
                            "mode kv reduces the keys and values of self-attention: use sites [attn1]",
                            list(config.sites),
                            True,
                        )
                    ]
                )

    def sites(self, model: torch.nn.Module, config: RunConfig) -> list[tuple[torch.nn.Module, SiteInfo, Any]]:
        """(sub-module, site, its Transformer2DModel) for every site the config reduces, in forward order."""
        found = []
        block = 0
        for path, module in model.named_modules():
            if not (isinstance(module, Transformer2DModel) and module.is_input_continuous):
                continue
            for index, transformer_block in enumerate(module.transformer_blocks):
                if not isinstance(transformer_block, BasicTransformerBlock):
                    continue
                prefix = f"{path}.transformer_blocks.{index}" if path else f"transformer_blocks.{index}"
                for kind in config.sites:
                    sub = getattr(transformer_block, kind, None)
                    if sub is not None:
                        found.append((sub, SiteInfo(f"{prefix}.{kind}", kind, FAMILY, block), module))
                block += 1
        return found

    def attach(self, model: torch.nn.Module, engine: Engine, config: RunConfig) -> list[SiteInfo]:
        self.check(config)
        sites = self.sites(model, config)
        if not sites:
            return []
        cells: dict[int, GridCell] = {}
        for sub, site, transformer in sites:
            if id(transformer) not in cells:
                cells[id(transformer)] = GridCell()
                GridHook(engine, cells[id(transformer)], _spatial_grid).register(transformer)
            TokenSiteHook(engine, site, cells[id(transformer)], config.mode).register(sub)
        index = 1 if isinstance(model, UNet2DConditionModel) else 2  # Transformer2DModel: (x, ehs, timestep)
        StepHook(engine, timestep_index=index).register(model)
        return [site for _, site, _ in sites]
