"""The Flux adapter: ToMA on the image tokens of ``FluxTransformer2DModel``.

Text tokens (any length: read from the inputs) pass untouched. The image grid comes from ``img_ids`` (a hook on
the transformer's forward). Sites, by block family:

- ``double`` blocks: ``attn1`` is the joint attention (image part of Q/K/V in ``tokens`` mode, image K/V only in
  ``kv`` mode); ``ff`` is the image feed-forward (``tokens`` mode).
- ``single`` blocks (``attn1``): ``tokens`` mode runs the whole block — attention and parallel MLP, output
  projection included — on the merged image tokens and unmerges only the block's update,
  out = x + U·(f(M·x) − M·x), so the residual stream stays exact; ``kv`` mode reduces image K/V of its
  attention.

RoPE: in ``tokens`` mode the (cos, sin) tables are gathered at the destination positions (destinations are
chosen once for the whole batch, from batch-pooled features, since the tables carry no batch dimension); in
``kv`` mode RoPE is applied at full positions first, then K and V are reduced.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,
)
from torch import Tensor

from tokred.adapters.base import Adapter, BlockPattern, Grid, SiteRule
from tokred.adapters.hooks import GridCell, TokenSiteHook, TokredHook
from tokred.engine import Engine
from tokred.plan import MergePlan
from tokred.strategies.base import SiteInfo

Rope = tuple[Tensor, Tensor]


def grid_from_ids(img_ids: Tensor | None) -> tuple[int, int] | None:
    """(h, w) when ``img_ids`` rows are (·, row, col) of a full row-major grid; None otherwise (no merging)."""
    if not isinstance(img_ids, Tensor):
        return None
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    rows, cols = rows - rows.min(), cols - cols.min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != ids.shape[0]:
        return None
    expected = torch.arange(h * w, device=ids.device)
    if not bool((rows * w + cols == expected).all()):
        return None
    return h, w


def gather_rope(rope: Rope, text_len: int, destinations: Tensor) -> Rope:
    """(cos, sin) of the text positions followed by those of the destination image tokens."""
    index = torch.cat((torch.arange(text_len, device=destinations.device), destinations + text_len))
    return rope[0].index_select(0, index.to(rope[0].device)), rope[1].index_select(0, index.to(rope[1].device))


def _shared_destinations(plan: MergePlan) -> Tensor:
    return plan.destinations[0]  # built with share_batch: every row is the same


def accepts_key_bias(attention: torch.nn.Module) -> bool:
    """Proportional attention needs an additive mask, which diffusers' flash and sage backends refuse: it is
    used only with the default (native) backend."""
    processor = getattr(attention, "processor", None)
    backend = getattr(getattr(processor, "original", processor), "_attention_backend", None)
    return backend is None or str(getattr(backend, "value", backend)) == "native"


def joint_key_bias(plan: MergePlan, text_len: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, L+D): 0 on the text keys, log(size) on the merged image keys (proportional attention)."""
    sizes = plan.log_sizes(dtype)
    text = sizes.new_zeros(sizes.shape[0], text_len)
    return torch.cat((text, sizes), dim=1)[:, None, None, :]


_ATTENTION_KWARGS = {"hidden_states", "encoder_hidden_states", "image_rotary_emb"}


class FluxAttentionSiteHook(TokenSiteHook):
    """Double-block joint attention in ``tokens`` mode: image Q/K/V merged, RoPE gathered, image output unmerged.

    Calls with anything more (an attention mask, IP-adapter states) run unchanged.
    """

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self._pending = None
        hidden = kwargs.get("hidden_states")
        text = kwargs.get("encoder_hidden_states")
        rope = kwargs.get("image_rotary_emb")
        if args or set(kwargs) - _ATTENTION_KWARGS or not isinstance(text, Tensor) or rope is None:
            return args, kwargs
        plan = self.engine.plan_for(self.site, hidden, self.cell.grid, share_batch=self.share_batch)
        if plan is None:
            return args, kwargs
        self._pending = plan
        rope = gather_rope(rope, text.shape[1], _shared_destinations(plan))
        kwargs = {**kwargs, "hidden_states": plan.merge(hidden), "image_rotary_emb": rope}
        if self.engine.proportional and accepts_key_bias(module):
            kwargs["attention_mask"] = joint_key_bias(plan, text.shape[1], hidden.dtype)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        plan, self._pending = self._pending, None
        if plan is None:
            return output
        image, text = output
        return plan.unmerge(image), text


class FluxSingleBlockSiteHook(TokenSiteHook):
    """A whole single block in ``tokens`` mode, on the merged image tokens; only its update is unmerged."""

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self._pending = None
        hidden = kwargs.get("hidden_states")
        text = kwargs.get("encoder_hidden_states")
        rope = kwargs.get("image_rotary_emb")
        if args or kwargs.get("joint_attention_kwargs") or not isinstance(text, Tensor) or rope is None:
            return args, kwargs  # positional calls, masks and IP-adapter states run unchanged
        plan = self.engine.plan_for(self.site, hidden, self.cell.grid, share_batch=self.share_batch)
        if plan is None:
            return args, kwargs
        merged = plan.merge(hidden)
        self._pending = (plan, hidden, merged)
        rope = gather_rope(rope, text.shape[1], _shared_destinations(plan))
        kwargs = {**kwargs, "hidden_states": merged, "image_rotary_emb": rope}
        if self.engine.proportional and accepts_key_bias(module.attn):
            kwargs["joint_attention_kwargs"] = {"attention_mask": joint_key_bias(plan, text.shape[1], hidden.dtype)}
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        pending, self._pending = self._pending, None
        if pending is None:
            return output
        plan, hidden, merged = pending
        text_out, image_out = output
        out = hidden + plan.unmerge(image_out - merged)
        if out.dtype == torch.float16:  # as the block does to its own output
            out = out.clip(-65504, 65504)
        return text_out, out


class ReducedKVProcessor:
    """A Flux attention processor that applies RoPE at full positions, then reduces the image keys and values.

    Installed by :class:`FluxKVSiteHook` while a patch is active (the stock processor computes RoPE and attention
    in one call, leaving no point to reduce K/V after RoPE); the module's own projections and norms, diffusers'
    ``apply_rotary_emb`` and ``scaled_dot_product_attention`` do the work. Without a plan it defers to the
    original processor.
    """

    def __init__(self, original: Any, hook: FluxKVSiteHook) -> None:
        self.original = original
        self.hook = hook

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Rope | None = None,
        **kwargs: Any,
    ) -> Any:
        plan, image_len = self.hook.take_plan()
        if plan is None or attention_mask is not None or image_rotary_emb is None or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query, e_key, e_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((e_query, query), (e_key, key), (e_value, value)))
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_len = key.shape[1] - image_len

        def reduce(t: Tensor) -> Tensor:  # (B, L+N, H, d) -> (B, L+D, H, d): image part merged
            image = plan.merge(t[:, text_len:].flatten(2)).unflatten(-1, t.shape[2:])
            return torch.cat((t[:, :text_len], image), dim=1)

        key, value = reduce(key), reduce(value)
        use_bias = self.hook.engine.proportional and accepts_key_bias(attn)
        bias = joint_key_bias(plan, text_len, query.dtype) if use_bias else None
        out = dispatch_attention_fn(  # the backend (and parallel config) the original processor was given
            query,
            key,
            value,
            attn_mask=bias,
            backend=getattr(self.original, "_attention_backend", None),
            parallel_config=getattr(self.original, "_parallel_config", None),
        )
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split_with_sizes([encoder_hidden_states.shape[1], image_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class FluxKVSiteHook(TokredHook):
    """``kv`` mode on a Flux attention (double or single block): image keys and values reduced after RoPE."""

    role = "site"

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell) -> None:
        super().__init__(engine)
        self.site, self.cell = site, cell
        self._pending: tuple[MergePlan | None, int] = (None, 0)
        self._original: Any = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._original = module.processor
        if not isinstance(self._original, torch.nn.Module):  # module processors (IP-adapter) keep their own path
            module.processor = ReducedKVProcessor(self._original, self)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        if isinstance(module.processor, ReducedKVProcessor) and module.processor.hook is self:
            module.processor = self._original
        return module

    def take_plan(self) -> tuple[MergePlan | None, int]:
        pending, self._pending = self._pending, (None, 0)
        return pending

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        self._pending = (None, 0)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        grid = self.cell.grid
        if not isinstance(hidden, Tensor) or grid is None or not isinstance(module.processor, ReducedKVProcessor):
            return args, kwargs
        image_len = grid[0] * grid[1]
        joint = self.site.family == "single"  # a single block's attention sees [text, image]
        if hidden.shape[1] < image_len or (not joint and hidden.shape[1] != image_len):
            return args, kwargs
        image = hidden[:, hidden.shape[1] - image_len :] if joint else hidden
        plan = self.engine.plan_for(self.site, image, grid)
        if plan is not None:
            self._pending = (plan, image_len)
        return args, kwargs


def _single_tokens_site(engine: Engine, site: SiteInfo, cell: GridCell) -> TokredHook:
    return FluxSingleBlockSiteHook(engine, site, cell, "tokens", share_batch=True)


def _double_attention_site(engine: Engine, site: SiteInfo, cell: GridCell) -> TokredHook:
    return FluxAttentionSiteHook(engine, site, cell, "tokens", share_batch=True)


def _feed_forward_site(engine: Engine, site: SiteInfo, cell: GridCell) -> TokredHook:
    return TokenSiteHook(engine, site, cell, "tokens", share_batch=True)


class FluxAdapter(Adapter):
    """FluxTransformer2DModel (FLUX.1 dev/schnell layout): double and single blocks, image tokens only."""

    label = "Flux"
    model_types = (FluxTransformer2DModel,)
    timestep = (3, "timestep")
    patterns = (
        BlockPattern(
            family="double",
            container="transformer_blocks",
            types=(FluxTransformerBlock,),
            sites=(
                SiteRule("attn1", "attn", {"tokens": _double_attention_site, "kv": FluxKVSiteHook}),
                SiteRule("ff", "ff", {"tokens": _feed_forward_site}),
            ),
        ),
        BlockPattern(
            family="single",
            container="single_transformer_blocks",
            types=(FluxSingleTransformerBlock,),
            sites=(
                SiteRule("attn1", "", {"tokens": _single_tokens_site}),
                SiteRule("attn1", "attn", {"kv": FluxKVSiteHook}),
            ),
        ),
    )

    def read_grid(self, args: tuple, kwargs: dict) -> Grid | None:
        return grid_from_ids(kwargs.get("img_ids", args[4] if len(args) > 4 else None))
