"""Structured inputs for a denoiser's forward: smooth latents and random conditioning, as a ready call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred.bench.synthetic import smooth_latents, smooth_tokens
from tokred.errors import TokredError


def denoiser_inputs(
    model: torch.nn.Module, *, height: int, width: int, batch: int = 1, text_tokens: int = 77, seed: int = 0
) -> tuple[Callable[[], Any], torch.Tensor]:
    """A call of ``model`` (a UNet2DConditionModel or FluxTransformer2DModel) on structured inputs for an image
    of height×width, and the latent behind it as (C, h, w) for pictures."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    gen = torch.Generator().manual_seed(seed + 1)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype

    def put(t: torch.Tensor) -> torch.Tensor:  # drawn on the CPU (reproducible), used where the model is
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    if isinstance(model, UNet2DConditionModel):
        cfg = model.config
        latent = put(smooth_latents(batch, cfg.in_channels, height // 8, width // 8, seed=seed))
        text = put(torch.randn(batch, text_tokens, cfg.cross_attention_dim, generator=gen))
        kwargs: dict[str, Any] = {}
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            size = [height, width, 0, 0, height, width]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": put(torch.randn(batch, pooled, generator=gen)),
                "time_ids": put(torch.tensor([size] * batch, dtype=torch.float32)),
            }
        timestep = torch.tensor(500, device=device)
        # sample passed positionally: tomesd 0.1.3 fails on a keyword-only call
        return (lambda: model(latent, timestep, text, **kwargs)), latent[0]
    if isinstance(model, FluxTransformer2DModel):
        cfg = model.config
        h, w = height // 16, width // 16
        tokens = put(smooth_tokens((h, w), cfg.in_channels, batch=batch, seed=seed))
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        inputs = {
            "hidden_states": tokens,
            "encoder_hidden_states": put(torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=gen)),
            "pooled_projections": put(torch.randn(batch, cfg.pooled_projection_dim, generator=gen)),
            "timestep": put(torch.full((batch,), 0.5)),
            "img_ids": put(ids.reshape(h * w, 3)),
            "txt_ids": put(torch.zeros(text_tokens, 3)),
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = put(torch.full((batch,), 3.5))
        return (lambda: model(**inputs)), tokens[0].T.reshape(-1, h, w)
    raise TokredError(f"bench handles UNet2DConditionModel and FluxTransformer2DModel, not {type(model).__name__}")
