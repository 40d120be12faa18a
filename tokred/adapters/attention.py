"""Attention on merged tokens: proportional attention (fold / mask / flex / off), per-sample RoPE, and the
attention-processor sites that run them.

**Proportional attention.** A merged key stands for ``s`` tokens; adding log(s) to its logits gives it the weight
those tokens had. There are three exact ways to do it:

- ``fold``: one extra head channel carries the bias, and no mask reaches the kernel. With the scale ``c`` passed
  explicitly, q′ = [q, 1], k′ = [k, log(s)/c], v′ = [v, 0], zero-padded to a multiple of 8 channels; the output
  is sliced back. q′·k′·c = q·k·c + log(s). Flash kernels stay eligible; the price is (d+p)/d attention FLOPs.
- ``mask``: an additive (B, 1, 1, keys) mask. Exact, but keeps SDPA off its flash kernel on GPUs, and several
  diffusers backends refuse masks.
- ``flex``: FlexAttention with a ``score_mod`` adding the bias (fast where compiled; eager on the CPU it
  materialises the score matrix).

``auto`` picks ``fold`` wherever the backend takes the extra channels, else ``mask`` where masks are taken, else
turns proportional attention off with one warning: never a crash, never a silent change of the math.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.adapters.hooks import GridCell, Site, _forget, records
from tokred.engine import Engine
from tokred.strategies.base import SiteInfo

logger = logging.getLogger(__name__)

WAYS = ("auto", "fold", "mask", "flex", "off")

#: diffusers' sage backends (AttentionBackendName values): no mask, head dims 64, 96 and 128 only
SAGE = (
    "sage",
    "sage_hub",
    "sage_varlen",
    "sage_blackwell_hub",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
)
#: diffusers backends that refuse an additive float mask, or mangle one
MASK_REFUSED = frozenset(
    {
        "flash",
        "flash_hub",
        "flash_varlen",
        "flash_varlen_hub",
        "flash_4_hub",
        "_flash_3",
        "_flash_varlen_3",
        "_flash_3_hub",
        "_flash_3_varlen_hub",
        "aiter_fa2_hub",
        "_native_flash",
        "_native_xla",
        "_native_npu",
        *SAGE,
    }
)
#: backends whose kernels take only some head dims (the folded head dim must be one of them)
HEAD_DIMS: dict[str, frozenset[int]] = {name: frozenset({64, 96, 128}) for name in SAGE}
#: the widest head dim of flash-style kernels
MAX_HEAD_DIM = 256
#: a processor that calls torch's SDPA itself, whatever diffusers backend is active (the UNet's AttnProcessor2_0)
DIRECT = "torch-sdpa"


def backend_name(backend: Any) -> str:
    """``AttentionBackendName`` or string -> its string value."""
    return str(getattr(backend, "value", backend))


def active_backend(processor: Any) -> str:
    """The backend a diffusers processor's attention runs on: its own (``set_attention_backend``), else the global
    one (``attention_backend(...)``, ``DIFFUSERS_ATTN_BACKEND``); :data:`DIRECT` for processors that call SDPA
    themselves."""
    if not hasattr(processor, "_attention_backend"):
        return DIRECT
    own = getattr(processor, "_attention_backend", None)
    if own is not None:
        return backend_name(own)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return backend_name(_AttentionBackendRegistry.get_active_backend()[0])


def folded_dim(head_dim: int) -> int:
    """Head dim with the bias channel added, padded with zeros to a multiple of 8."""
    return (head_dim // 8 + 1) * 8


def can_fold(backend: str, head_dim: int) -> bool:
    folded = folded_dim(head_dim)
    allowed = HEAD_DIMS.get(backend)
    if allowed is not None:
        return folded in allowed
    return folded <= MAX_HEAD_DIM or backend in (DIRECT, "native", "_native_math", "flex")


def can_mask(backend: str) -> bool:
    return backend not in MASK_REFUSED


_warned: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def choose_way(way: str, backend: str, head_dim: int) -> str:
    """The way proportional attention runs on ``backend`` for heads of ``head_dim``: the asked way when the backend
    takes it, else another exact way, else ``off`` (with one warning per backend)."""
    if way == "off":
        return "off"
    fold, mask = can_fold(backend, head_dim), can_mask(backend)
    if way == "auto":
        if fold:
            return "fold"
        if mask:
            return "mask"
    elif (
        (way == "fold" and fold)
        or (way == "mask" and mask)
        or (way == "flex" and backend in (DIRECT, "native", "flex"))
    ):
        return way
    else:
        other = "fold" if fold else "mask" if mask else None
        if other is not None:
            _warn_once(
                (way, backend),
                f"tokred: proportional attention '{way}' does not run on attention backend '{backend}'; "
                f"using '{other}' (the same math)",
            )
            return other
    _warn_once(
        ("off", backend),
        f"tokred: attention backend '{backend}' takes neither a mask nor a folded head dim of "
        f"{folded_dim(head_dim)}: merged tokens run without proportional attention there",
    )
    return "off"


def fold(query: Tensor, key: Tensor, value: Tensor, key_bias: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q′, k′, v′ in (B, S, H, D′) with the (B, keys) bias folded into one extra channel (zero-padded to 8).

    ``query·key·scale + bias == q′·k′·scale`` for every query, head and key; ``v′`` carries zeros there, so the
    attention output's first D channels are unchanged.
    """
    batch, keys, heads, dim = key.shape
    pad = folded_dim(dim) - dim
    ones = query.new_zeros(*query.shape[:-1], pad)
    ones[..., 0] = 1
    extra = key.new_zeros(batch, keys, heads, pad)
    extra[..., 0] = (key_bias / scale).to(key.dtype).unsqueeze(-1)
    return (
        torch.cat((query, ones), dim=-1),
        torch.cat((key, extra), dim=-1),
        torch.cat((value, value.new_zeros(*value.shape[:-1], pad)), dim=-1),
    )


def aligned_mask(key_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, K) additive mask whose last dim is stored with a stride that is a multiple of 8 (kernels that take
    masks want aligned rows; the values beyond K are never read)."""
    batch, keys = key_bias.shape
    padded = -(-keys // 8) * 8
    storage = key_bias.new_zeros(batch, 1, 1, padded, dtype=dtype)
    storage[..., :keys] = key_bias.to(dtype).view(batch, 1, 1, keys)
    return storage[..., :keys]


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_bias: Tensor | None,
    way: str,
    backend: str,
    scale: float | None = None,
    processor: Any = None,
) -> Tensor:
    """Attention over (B, S, H, D) tensors, with ``key_bias`` (B, keys) added to the logits the way ``way`` says.

    ``backend`` is :data:`DIRECT` for torch's SDPA called here, else a diffusers backend used through
    ``dispatch_attention_fn`` (with the processor's own backend and parallel config). Returns (B, S, H, D).
    """
    head_dim = query.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    mask = None
    if key_bias is not None and way == "fold":
        query, key, value = fold(query, key, value, key_bias, scale)
    elif key_bias is not None and way == "mask":
        mask = aligned_mask(key_bias, query.dtype)
    elif key_bias is not None and way == "flex":
        return _flex(query, key, value, key_bias, scale)
    if backend == DIRECT:
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale
        ).transpose(1, 2)
    else:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            scale=scale,
            backend=getattr(processor, "_attention_backend", None),
            parallel_config=getattr(processor, "_parallel_config", None),
        )
    return out[..., :head_dim] if out.shape[-1] != head_dim else out


def _flex(query: Tensor, key: Tensor, value: Tensor, key_bias: Tensor, scale: float) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    bias = key_bias.to(query.dtype)

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return score + bias[b, k]

    out = flex_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), score_mod, scale=scale)
    return out.transpose(1, 2)  # type: ignore[union-attr]


# --- RoPE at merged positions -----------------------------------------------------------------------------------


def gather_positions(table: Tensor, index: Tensor) -> Tensor:
    """Rows of a (S, D) positional table at ``index`` ((K,) shared or (B, K) per sample) -> (K, D) or (B, K, D)."""
    return table[index.to(table.device)]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Flux-style (interleaved pairs) rotary embedding of ``x`` (B, S, H, D) with (S, D) or per-sample (B, S, D)
    tables — diffusers' ``apply_rotary_emb(use_real_unbind_dim=-1, sequence_dim=1)``, which takes (S, D) only."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    cos, sin = cos.to(x.device), sin.to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack((-imag, real), dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# --- sites at attention modules -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _call_signature(processor_type: type) -> inspect.Signature:
    return inspect.signature(processor_type.__call__)


class SiteProcessor:
    """The processor tokred installs on an attention module while a patch is active, in place of the module's own
    (``original``): every call goes to its site, which defers to ``original`` whenever it has nothing to do.

    Running inside the module's forward keeps tokred innermost: a diffusers cache hook on the module that skips
    the call skips tokred with it. Its ``__call__`` takes exactly the parameters of the original processor (diffusers
    passes a module only the keyword arguments its processor declares); the backend and parallel config diffusers
    sets on processors reach the original.
    """

    def __init__(self, original: Any, site: Any) -> None:
        self.original = original
        self.site = site

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.site.removed:  # kept by someone after the patch was removed (a saved processor dict): inert
            return self.original(attn, *args, **kwargs)
        return self.site.process(self.original, attn, *args, **kwargs)

    @property
    def _attention_backend(self) -> Any:  # diffusers' set_attention_backend sets this on processors that have it
        if not hasattr(self.original, "_attention_backend"):
            raise AttributeError("_attention_backend")  # hasattr() is False, as for the original
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        if not hasattr(self.original, "_parallel_config"):
            raise AttributeError("_parallel_config")
        return self.original._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    @classmethod
    def wrapping(cls, original: Any, site: Any) -> SiteProcessor:
        """A site processor whose ``__call__`` has the signature of ``original``'s."""
        return _processor_class(type(original))(original, site)


class _StandsFor(type):
    """The type of a generated site-processor class: it compares equal to the processor class it wraps, and called
    with no arguments it makes a plain one. diffusers checks processors by class (``set_default_attn_processor``
    accepts only classes it knows: ``proc.__class__ in (...)``) and rebuilds them as ``proc.__class__()`` (IP-adapter
    loading); both then see the original. A processor set that way replaces tokred's, and the site wraps the new
    one at the next model call (:meth:`AttentionSite.keep`)."""

    wrapped_type: type

    def __eq__(cls, other: object) -> bool:
        return cls is other or other is cls.__dict__.get("wrapped_type")

    def __hash__(cls) -> int:
        return type.__hash__(cls)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and "wrapped_type" in cls.__dict__:
            return cls.wrapped_type()
        return super().__call__(*args, **kwargs)


@functools.lru_cache(maxsize=64)
def _processor_class(processor_type: type) -> type:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
        if self.site.removed:
            return self.original(*args, **kwargs)
        return self.site.process(self.original, *args, **kwargs)

    __call__.__signature__ = _call_signature(processor_type)  # type: ignore[attr-defined]
    name = f"SiteProcessor[{processor_type.__name__}]"
    return _StandsFor(name, (SiteProcessor,), {"__call__": __call__, "wrapped_type": processor_type})


class AttentionSite(Site):
    """A site at an attention module. Normally it swaps in a :class:`SiteProcessor` and does its work in
    :meth:`process`. A processor that is itself a module (IP-adapter processors hold weights) is not swapped, since
    it would leave the model's module tree; torch hooks around the attention module (:meth:`hooked_pre`,
    :meth:`hooked_post`) then reduce what they can from outside.
    """

    def __init__(self, engine: Engine, site: SiteInfo, cell: GridCell, mode: str = "tokens") -> None:
        super().__init__(engine, site, cell)
        self.mode = mode
        self.processor: SiteProcessor | None = None
        self.handles: tuple[Any, ...] = ()
        self._pending: Any = None
        self.removed = False

    @classmethod
    def modes(cls, *modes: str) -> dict[str, Any]:
        """The hook factories of a :class:`~tokred.adapters.base.SiteRule`: this site in each of ``modes``."""
        return {mode: functools.partial(cls, mode=mode) for mode in modes}

    def register(self, module: torch.nn.Module) -> None:
        if self.name in records(module):
            raise ValueError(f"{type(module).__name__} already has a {self.name} hook")
        self._install(module, module.processor)
        records(module)[self.name] = self

    def _install(self, module: torch.nn.Module, processor: Any) -> None:
        """Wrap ``processor``, or hook around the module when the processor is itself a module (it holds weights and
        must stay in the module tree)."""
        if isinstance(processor, torch.nn.Module):
            self.processor = None
            self.handles = (
                module.register_forward_pre_hook(self._hooked_pre, with_kwargs=True),
                module.register_forward_hook(self._hooked_post),
            )
        else:
            self.processor = SiteProcessor.wrapping(processor, self)
            module.processor = self.processor

    def remove(self, module: torch.nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        current = module.processor
        if isinstance(current, SiteProcessor) and current.site is self:  # (one set by someone else meanwhile stays)
            module.processor = current.original
        self.removed = True
        _forget(module, self.name)

    def in_place(self, module: torch.nn.Module) -> bool:
        if self.handles:
            return self.handles[0].id in module._forward_pre_hooks
        return module.processor is self.processor

    def keep(self, module: torch.nn.Module) -> None:
        """Called at each model call, outside compiled code: when the module's processor was replaced since the
        last call (``set_default_attn_processor``, ``set_attn_processor``, ``fuse_qkv_projections``, IP-adapter
        loading), the site takes its place around the new one instead of silently stopping."""
        if self.handles:
            return  # torch hooks around the module: they hold whatever the processor
        current = module.processor
        if current is self.processor:
            return
        if isinstance(current, SiteProcessor):
            if current.site is self:  # an earlier wrapper of ours put back (unfuse_qkv_projections restores them)
                self.processor = current
            return  # else another patch's
        self._install(module, current)

    def process(self, original: Any, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return original(attn, *args, **kwargs)

    def _hooked_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._pending = None
        return self.hooked_pre(module, args, kwargs)

    def _hooked_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        pending, self._pending = self._pending, None
        return output if pending is None else self.hooked_post(module, pending, output)

    def hooked_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return None

    def hooked_post(self, module: torch.nn.Module, pending: Any, output: Any) -> Any:
        return output

    def foreign_way(self, processor: Any) -> str:
        """How proportional attention runs through a processor tokred does not run itself (an IP-adapter's, a
        classic ``AttnProcessor``): only as its attention mask, where its backend takes one; else ``off``, with
        one warning."""
        if self.engine.proportional_way == "off":
            return "off"
        backend = active_backend(processor)
        if can_mask(backend):
            return "mask"
        _warn_once(
            ("foreign", backend),
            f"tokred: {type(processor).__name__} on attention backend '{backend}' takes no mask: merged tokens run "
            "without proportional attention through it",
        )
        return "off"

    def way(self, original: Any, head_dim: int, direct: bool = False) -> str:
        """How proportional attention runs for this call (see :func:`choose_way`)."""
        backend = DIRECT if direct else active_backend(original)
        return choose_way(self.engine.proportional_way, backend, head_dim)
