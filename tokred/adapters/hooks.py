"""diffusers ``ModelHook``s shared by the adapters: step counting, grid recording and token sites.

Hooks rewrite a module's inputs (``pre_forward``) and outputs (``post_forward``); no diffusers forward is
copied and no class is swapped. Every hook tokred registers is named ``tokred.<role>`` so that removal can find
them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor

from tokred.engine import Engine
from tokred.strategies.base import SiteInfo

HOOK_PREFIX = "tokred."


@dataclass
class GridCell:
    """The token grid (h, w) of the block now running, written by a grid hook, read by its sites."""

    grid: tuple[int, int] | None = None


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _replace_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


class TokredHook(ModelHook):
    """Base of tokred's hooks: each belongs to one engine (one patch).

    The hooks are stateful in diffusers' sense, like its cache hooks: ``HookRegistry.reset_stateful_hooks()``
    (which pipelines run at the end of every call, through ``maybe_free_model_hooks``) ends the current denoising
    run, so the next call starts at step 0 with fresh plans.
    """

    role = "hook"
    _is_stateful = True

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def register(self, module: torch.nn.Module) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(self, HOOK_PREFIX + self.role)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        if hasattr(self, "_pending"):
            self._pending = None
        return module


class StepHook(TokredHook):
    """On the denoiser: tells the engine that the model is called, with which timestep."""

    role = "step"

    def __init__(self, engine: Engine, timestep_index: int = 1, timestep_name: str = "timestep") -> None:
        super().__init__(engine)
        self.timestep_index, self.timestep_name = timestep_index, timestep_name

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self.engine.begin_model_call(_argument(args, kwargs, self.timestep_index, self.timestep_name))
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.engine.new_run()
        return module


class GridHook(TokredHook):
    """On a module whose input carries the grid: records it in a :class:`GridCell` for its sites."""

    role = "grid"

    def __init__(self, engine: Engine, cell: GridCell, read_grid: Callable[[tuple, dict], tuple[int, int] | None]):
        super().__init__(engine)
        self.cell, self.read_grid = cell, read_grid

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self.cell.grid = self.read_grid(args, kwargs)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cell.grid = None
        return module


class TokenSiteHook(TokredHook):
    """On a sub-layer taking ``hidden_states`` (B, N, C) first and returning (B, N, C).

    ``tokens`` mode: the sub-layer runs on the merged tokens and its output is unmerged. ``kv`` mode (self-
    attention): the merged tokens are passed as ``encoder_hidden_states``, so keys and values are reduced while
    the queries stay full; nothing to unmerge.
    """

    role = "site"

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell, mode: str, share_batch: bool = False) -> None:
        super().__init__(engine)
        self.site, self.cell, self.mode = site, cell, mode
        self.share_batch = share_batch  # one set of destinations for the whole batch
        self._pending: Any = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self._pending = None
        hidden = _argument(args, kwargs, 0, "hidden_states")
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            return args, kwargs
        if self.site.kind == "attn1" and (
            kwargs.get("attention_mask") is not None or kwargs.get("encoder_hidden_states") is not None
        ):
            return args, kwargs  # a masked or cross-only self-attention: its keys are not these tokens
        if self.mode == "kv" and getattr(module, "fused_projections", False):
            return args, kwargs  # fused QKV has no separate K/V projection to feed merged tokens to
        plan = self.engine.plan_for(self.site, hidden, self.cell.grid, share_batch=self.share_batch)
        if plan is None:
            return args, kwargs
        merged = plan.merge(hidden)
        if self.site.kind == "attn1" and self.engine.proportional:
            # a merged key stands for several tokens: log(size) on its logits keeps their total weight
            kwargs = {**kwargs, "attention_mask": plan.log_sizes(hidden.dtype).unsqueeze(1)}
        if self.mode == "kv":
            return args, {**kwargs, "encoder_hidden_states": merged}
        self._pending = plan
        return _replace_argument(args, kwargs, 0, "hidden_states", merged)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        plan, self._pending = self._pending, None
        if plan is None:
            return output
        if isinstance(output, tuple):
            return (plan.unmerge(output[0]), *output[1:])
        return plan.unmerge(output)


def tokred_hooks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, ModelHook]]:
    """Every tokred hook registered on ``model`` or its sub-modules."""
    found = []
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name, hook in list(registry.hooks.items()):
            if name.startswith(HOOK_PREFIX):
                found.append((module, name, hook))
    return found


def remove_hooks(model: torch.nn.Module, engine: Engine | None = None) -> int:
    """Remove tokred's hooks (only ``engine``'s when given); returns how many were removed.

    A module left without hooks gets its plain forward back, as if nothing had been registered.
    """
    removed = 0
    for module, name, hook in tokred_hooks(model):
        if engine is not None and getattr(hook, "engine", None) is not engine:
            continue
        registry = module._diffusers_hook
        registry.remove_hook(name, recurse=False)
        removed += 1
        if not registry.hooks:
            del module._diffusers_hook
            if module.__dict__.get("forward") == type(module).forward.__get__(module):
                del module.__dict__["forward"]
    return removed
