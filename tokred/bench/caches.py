"""Step caches as bench methods: diffusers' cache hooks and cache-dit's DBCache, alone or under a tokred preset.

A bench method ``fbc`` runs the denoiser with FirstBlockCache; ``toma_flux+fbc`` with both. Caches skip work across
denoising steps, so they are measured on whole runs (``steps`` > 1: a flow-matching loop over the denoiser).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokred.errors import TokredError


@dataclass(frozen=True)
class Cache:
    """A step cache: its name, what it is, its settings with their defaults, and how to switch it on and off."""

    name: str
    description: str
    defaults: dict[str, float]
    enable: Callable[[torch.nn.Module, int, dict[str, Any]], None]
    disable: Callable[[torch.nn.Module], None]

    def settings(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """The defaults with ``options`` laid over them; an unknown key is refused by name."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise TokredError(f"cache {self.name!r} has no setting {names}; allowed: {', '.join(self.defaults)}")
        return {**self.defaults, **options}

    def describe(self, options: dict[str, Any] | None) -> str:
        settings = self.settings(options)
        return f"{self.name}: {self.description} (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


def _diffusers(make: Callable[[torch.nn.Module, dict[str, Any]], Any]) -> tuple[Callable, Callable]:
    def enable(model: torch.nn.Module, steps: int, settings: dict[str, Any]) -> None:
        if not hasattr(model, "enable_cache"):
            raise TokredError(f"{type(model).__name__} takes no diffusers step cache (no enable_cache)")
        model.enable_cache(make(model, settings))

    return enable, lambda model: model.disable_cache()


def _first_block(model: torch.nn.Module, settings: dict[str, Any]) -> Any:
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=float(settings["threshold"]))


def _taylorseer(model: torch.nn.Module, settings: dict[str, Any]) -> Any:
    from diffusers import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=int(settings["interval"]),
        disable_cache_before_step=int(settings["warmup"]),
        taylor_factors_dtype=torch.float32,
    )


def _pab(model: torch.nn.Module, settings: dict[str, Any]) -> Any:
    from diffusers import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(settings["skip"]),
        spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: getattr(model, "_tokred_bench_timestep", 500.0),
    )


def _dbcache_on(model: torch.nn.Module, steps: int, settings: dict[str, Any]) -> None:
    try:
        import cache_dit
    except ImportError:
        raise TokredError("dbcache needs the cache-dit package (pip install cache-dit)") from None
    for name in list(logging.root.manager.loggerDict):  # cache-dit logs every enable at INFO: keep the table clean
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=int(settings["fn"]),
        Bn_compute_blocks=int(settings["bn"]),
        max_warmup_steps=int(settings["warmup"]),
        residual_diff_threshold=float(settings["threshold"]),
    )
    plain = [module for module in model.modules() if "forward" not in module.__dict__]
    order = list(model._modules)
    cache_dit.enable_cache(model, cache_config=config)
    model._tokred_bench_unpatch = (plain, order)
    # cache-dit keeps a bare denoiser's state across runs: start each run afresh
    model._tokred_bench_before_run = lambda: cache_dit.refresh_context(model, num_inference_steps=steps)


def _dbcache_off(model: torch.nn.Module) -> None:
    import cache_dit

    cache_dit.disable_cache(model)
    # cache-dit 1.5 leaves its rewritten forwards on a Flux transformer after disable_cache, and its runs re-register
    # the block lists last (FirstBlockCache enabled later would take single_transformer_blocks.0 for the first block
    # and fail); both are put back here
    plain, order = model.__dict__.pop("_tokred_bench_unpatch", ((), []))
    for module in plain:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_is_patched", None)
    children = model._modules
    model._modules = {name: children[name] for name in [*order, *children] if name in children}
    model.__dict__.pop("_tokred_bench_before_run", None)


CACHES: dict[str, Cache] = {
    cache.name: cache
    for cache in (
        Cache("fbc", "diffusers' FirstBlockCache", {"threshold": 0.2}, *_diffusers(_first_block)),
        Cache("taylorseer", "diffusers' TaylorSeer cache", {"interval": 2, "warmup": 2}, *_diffusers(_taylorseer)),
        Cache("pab", "diffusers' pyramid attention broadcast, spatial", {"skip": 2}, *_diffusers(_pab)),
        Cache(
            "dbcache",
            "cache-dit's DBCache",
            {"threshold": 0.2, "fn": 1, "bn": 0, "warmup": 2},
            _dbcache_on,
            _dbcache_off,
        ),
    )
}


def split_method(name: str) -> tuple[str | None, str | None]:
    """``toma_flux+fbc`` -> ("toma_flux", "fbc"); ``fbc`` -> (None, "fbc"); ``toma`` -> ("toma", None)."""
    parts = name.split("+")
    caches = [part for part in parts if part in CACHES]
    others = [part for part in parts if part not in CACHES]
    if len(caches) > 1 or len(others) > 1:
        raise TokredError(f"method {name!r}: at most one tokred preset and one cache ({', '.join(CACHES)})")
    return (others[0] if others else None), (caches[0] if caches else None)
