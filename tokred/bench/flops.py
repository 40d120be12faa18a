"""FLOPs of what actually ran: torch's FlopCounterMode, taught to count CPU flash attention."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


@functools.lru_cache(maxsize=1)
def _register_cpu_attention() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return
    try:

        @register_flop_formula(op, get_raw=False)
        def _cpu_flash(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    except RuntimeError:  # registered already (by torch itself in a later release)
        pass


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return (its result, the FLOPs of its matmuls, convolutions and attention)."""
    _register_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())
