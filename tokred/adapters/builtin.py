"""tokred's own adapters, registered as a plugin. diffusers is imported only when a model is resolved."""

from __future__ import annotations

from typing import Any

from tokred.hookspecs import hookimpl


def _unet_adapter(options: Any) -> Any:
    from tokred.adapters.sdxl import UNetAdapter

    return UNetAdapter(options)


def _flux_adapter(options: Any) -> Any:
    from tokred.adapters.flux import FluxAdapter

    return FluxAdapter(options)


@hookimpl
def register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        "sdxl",
        _unet_adapter,
        description="SDXL and SD 1.x/2.x UNet2DConditionModel: attn1 / attn2 / ff of every BasicTransformerBlock",
    )
    register(
        "flux",
        _flux_adapter,
        description="FluxTransformer2DModel: image tokens of double-block attention / ff and of single blocks",
    )


@hookimpl
def resolve_adapter(model: Any) -> str | None:
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    from tokred.adapters.flux import FluxAdapter
    from tokred.adapters.sdxl import UNetAdapter

    if UNetAdapter.handles(model):
        return "sdxl"
    return "flux" if FluxAdapter.handles(model) else None
