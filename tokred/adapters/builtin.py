"""tokred's own adapters, registered as a plugin.

Each adapter's module is imported only when a model is resolved, and each on its own: if one cannot be imported
(a diffusers release without its model classes, say), the others still work and a warning names the one skipped.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from tokred.hookspecs import hookimpl

#: adapter name -> (module, class), in the order models are offered to them
BUILTIN_ADAPTERS: dict[str, tuple[str, str, str]] = {
    "sdxl": (
        "tokred.adapters.sdxl",
        "UNetAdapter",
        "SDXL and SD 1.x/2.x UNet2DConditionModel: attn1 / attn2 / ff of every BasicTransformerBlock",
    ),
    "flux": (
        "tokred.adapters.flux",
        "FluxAdapter",
        "FluxTransformer2DModel: image tokens of double-block attention / ff and of single blocks",
    ),
    "sd3": (
        "tokred.adapters.sd3",
        "SD3Adapter",
        "SD3Transformer2DModel (SD3, SD3.5): image tokens of the joint attention, SD3.5's second attention, ff",
    ),
    "flux2": (
        "tokred.adapters.flux2",
        "Flux2Adapter",
        "Flux2Transformer2DModel: image tokens of double-block attention / ff and of single blocks",
    ),
    "qwenimage": (
        "tokred.adapters.qwenimage",
        "QwenImageAdapter",
        "QwenImageTransformer2DModel: image tokens of the dual-stream attention and the image feed-forward",
    ),
    "wan": (
        "tokred.adapters.wan",
        "WanAdapter",
        "WanTransformer3DModel (Wan 2.x video): self-attention, cross-attention queries and ff on the f x h x w grid",
    ),
}

_unavailable: dict[str, str] = {}


def adapter_class(name: str) -> type | None:
    """The adapter class, imported on first use; None (with one warning) when its module cannot be imported."""
    module_name, class_name, _ = BUILTIN_ADAPTERS[name]
    if name in _unavailable:
        return None
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # one family's break must not stop the others
        _unavailable[name] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"tokred adapter {name!r} is unavailable: {_unavailable[name]}", RuntimeWarning, stacklevel=2)
        return None


def _factory(name: str):  # type: ignore[no-untyped-def]
    def build(options: Any) -> Any:
        cls = adapter_class(name)
        if cls is None:
            from tokred.errors import TokredError

            raise TokredError(f"tokred adapter {name!r} is unavailable: {_unavailable[name]}")
        return cls(options)

    build.__doc__ = BUILTIN_ADAPTERS[name][2]
    return build


@hookimpl
def register_adapters(register):  # type: ignore[no-untyped-def]
    for name in BUILTIN_ADAPTERS:
        register(name, _factory(name))


@hookimpl
def resolve_adapter(model: Any) -> str | None:
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    for name in BUILTIN_ADAPTERS:
        cls = adapter_class(name)
        if cls is not None and cls.handles(model):
            return name
    return None
