"""The QwenImage adapter: token reduction on the image tokens of ``QwenImageTransformerBlock``'s dual-stream blocks.

Sites: ``attn1`` is the joint attention (text first, then image; image Q/K/V merged in ``tokens`` mode, image K/V
in ``kv`` mode); ``ff`` is the image feed-forward (``img_mlp``). The grid is the first entry of ``img_shapes``
(frames, h, w) in packed tokens; image tokens after it (the condition images of edit pipelines) pass untouched.

RoPE is a pair of complex tables (image, text). diffusers' processor applies one image table to the whole batch
and refuses an attention mask, so the attention on merged tokens runs here: the module's own projections and norms,
each image's own positions, the text padding mask and proportional attention, through diffusers' dispatch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformerBlock,
)
from torch import Tensor

from tokred.adapters.attention import AttentionSite, active_backend, attend, gather_positions
from tokred.adapters.base import Adapter, BlockPattern, SiteRule
from tokred.adapters.hooks import TokenSiteHook, argument
from tokred.plan import MergePlan


def rotate_complex(x: Tensor, freqs: Tensor) -> Tensor:
    """Qwen's RoPE (pairs as complex numbers) with an (S, D/2) table or per-sample (B, S, D/2) tables."""
    freqs = freqs.unsqueeze(-2) if freqs.dim() == 3 else freqs.unsqueeze(1)
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class QwenAttentionSite(AttentionSite):
    """The dual-stream joint attention of a block."""

    def process(
        self,
        original: Any,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        def unchanged() -> Any:
            return original(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                attention_mask,
                image_rotary_emb,
                **kwargs,
            )

        if kwargs or attention_mask is not None or encoder_hidden_states is None or image_rotary_emb is None:
            return unchanged()
        if type(original) is not QwenDoubleStreamAttnProcessor2_0:
            return unchanged()
        grid_part, extra = self.split(hidden_states)
        plan = self.plan(grid_part)
        if plan is None:
            return unchanged()
        image = hidden_states if self.mode == "kv" else plan.merge(grid_part)
        if self.mode == "tokens" and extra is not None:
            image = torch.cat((image, extra), dim=1)
        image_out, text_out = self.attention(
            original, attn, image, encoder_hidden_states, encoder_hidden_states_mask, image_rotary_emb, plan
        )
        if self.mode == "kv":
            return image_out, text_out
        restored = plan.unmerge(image_out[:, : plan.num_destinations])
        if extra is not None:
            restored = torch.cat((restored, image_out[:, plan.num_destinations :]), dim=1)
        return restored, text_out

    def attention(
        self,
        original: Any,
        attn: torch.nn.Module,
        image: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        rope: tuple[Tensor, Tensor],
        plan: MergePlan,
    ) -> tuple[Tensor, Tensor]:
        head_dim = attn.inner_dim // attn.heads
        image_q, image_k, image_v = (p(image).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
        text_q, text_k, text_v = (
            p(text).unflatten(-1, (-1, head_dim)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            image_q = attn.norm_q(image_q)
        if attn.norm_k is not None:
            image_k = attn.norm_k(image_k)
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        image_freqs, text_freqs = rope
        tokens, extra = self.cell.tokens, self.cell.extra
        if self.mode == "tokens":  # each image's destinations at their own positions; extra tokens at theirs
            index = plan.destinations
            if extra:
                tail = torch.arange(tokens, tokens + extra, device=index.device).expand(index.shape[0], -1)
                index = torch.cat((index, tail), dim=1)
            image_freqs = gather_positions(image_freqs, index)
        image_q, image_k = rotate_complex(image_q, image_freqs), rotate_complex(image_k, image_freqs)
        text_q, text_k = rotate_complex(text_q, text_freqs), rotate_complex(text_k, text_freqs)
        if self.mode == "kv":  # keys and values of the grid merged after RoPE at full positions
            image_k, image_v = (
                torch.cat((plan.merge(t[:, :tokens].flatten(2)).unflatten(-1, t.shape[2:]), t[:, tokens:]), dim=1)
                for t in (image_k, image_v)
            )
        query, key, value = (
            torch.cat(pair, dim=1) for pair in ((text_q, image_q), (text_k, image_k), (text_v, image_v))
        )
        way = self.way(original, head_dim)
        batch, text_len = text.shape[0], text.shape[1]
        padded = text_mask is not None  # (the pipeline passes None when no text is padded)
        bias = None
        if way != "off" or padded:
            merged_keys = key.shape[1] - text_len - extra
            sizes = plan.log_sizes(query.dtype) if way != "off" else query.new_zeros(batch, merged_keys)
            bias = torch.cat((sizes.new_zeros(batch, text_len), sizes, sizes.new_zeros(batch, extra)), dim=1)
            if padded:  # text padding: never attended to (an additive mask then carries the bias as well)
                assert text_mask is not None
                blocked = torch.finfo(query.dtype).min
                bias[:, :text_len] = bias[:, :text_len].masked_fill(~text_mask.to(torch.bool), blocked)
                way = "mask"
        out = attend(query, key, value, key_bias=bias, way=way, backend=active_backend(original), processor=original)
        out = out.flatten(2, 3).to(query.dtype)
        image_out = attn.to_out[0](out[:, text_len:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(out[:, :text_len].contiguous())


class QwenImageAdapter(Adapter):
    """QwenImageTransformer2DModel (Qwen-Image and its edit variants): dual-stream blocks, image tokens only."""

    label = "QwenImage"
    model_types = (QwenImageTransformer2DModel,)
    timestep = (3, "timestep")
    patterns = (
        BlockPattern(
            family="dual",
            container="transformer_blocks",
            types=(QwenImageTransformerBlock,),
            sites=(
                SiteRule("attn1", "attn", QwenAttentionSite.modes("tokens", "kv")),
                SiteRule("ff", "img_mlp", {"tokens": TokenSiteHook}),
            ),
        ),
    )

    def read_grid(self, args: tuple, kwargs: dict) -> Any:
        """The first image of ``img_shapes`` (frames, h, w): (h, w) for one frame, else (frames, h, w); the image
        tokens after it are extra. None when the batch's images differ or the tokens do not match."""
        shapes = argument(args, kwargs, 4, "img_shapes")
        hidden = argument(args, kwargs, 0, "hidden_states")
        if not shapes or not isinstance(hidden, Tensor) or not all(s and s[0] == shapes[0][0] for s in shapes):
            return None
        frames, h, w = (int(v) for v in shapes[0][0])
        grid = (h, w) if frames == 1 else (frames, h, w)
        extra = hidden.shape[1] - math.prod(grid)
        return (grid, extra) if extra >= 0 else None

    def read_features(self, args: tuple, kwargs: dict) -> Tensor | None:
        hidden = argument(args, kwargs, 0, "hidden_states")
        return hidden if isinstance(hidden, Tensor) and hidden.dim() == 3 else None
