"""tokred's own adapters, registered as a plugin. diffusers is imported only when a model is resolved."""

from __future__ import annotations

from typing import Any

from tokred.hookspecs import hookimpl


def _unet_adapter(options: Any) -> Any:
    from tokred.adapters.sdxl import UNetAdapter

    return UNetAdapter(options)


@hookimpl
def register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        "sdxl",
        _unet_adapter,
        description="SDXL and SD 1.x/2.x UNet2DConditionModel: attn1 / attn2 / ff of every BasicTransformerBlock",
    )


@hookimpl
def resolve_adapter(model: Any) -> str | None:
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    from tokred.adapters import sdxl

    return "sdxl" if sdxl.handles(model) else None
