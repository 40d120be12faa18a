"""Structured inputs for a denoiser's forward: smooth latents and random conditioning, as a ready call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred.bench.synthetic import smooth_latents, smooth_tokens
from tokred.errors import TokredError


def denoiser_inputs(
    model: torch.nn.Module,
    *,
    height: int,
    width: int,
    batch: int = 1,
    text_tokens: int = 77,
    seed: int = 0,
    frames: int = 9,
) -> tuple[Callable[[], Any], torch.Tensor]:
    """A call of ``model`` (SDXL/SD UNet, Flux, SD3 or Wan transformer) on structured inputs for an image of
    height×width (a video of ``frames`` frames for Wan), and the latent behind it as (C, h, w) for pictures (a
    video's first latent frame)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, WanTransformer3DModel

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
    if isinstance(model, SD3Transformer2DModel):  # latents at 1/8 of the image, patches of 2x2
        cfg = model.config
        latent = put(smooth_latents(batch, cfg.in_channels, height // 8, width // 8, seed=seed))
        inputs = {
            "hidden_states": latent,
            "encoder_hidden_states": put(torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=gen)),
            "pooled_projections": put(torch.randn(batch, cfg.pooled_projection_dim, generator=gen)),
            "timestep": put(torch.full((batch,), 500.0)),
        }
        return (lambda: model(**inputs)), latent[0]
    if isinstance(model, WanTransformer3DModel):  # latents at 1/8 of the frame size, frames 4k+1 -> k+1
        cfg = model.config
        latent_frames = (frames - 1) // 4 + 1
        h, w = height // 8, width // 8
        tokens = smooth_tokens((h, w), cfg.in_channels, batch=batch * latent_frames, seed=seed)
        video = tokens.view(batch, latent_frames, h, w, cfg.in_channels).permute(0, 4, 1, 2, 3).contiguous()
        video = put(video)
        inputs = {
            "hidden_states": video,
            "timestep": put(torch.full((batch,), 500.0)),
            "encoder_hidden_states": put(torch.randn(batch, text_tokens, cfg.text_dim, generator=gen)),
        }
        return (lambda: model(**inputs)), video[0, :, 0]
    raise TokredError(
        f"bench handles the SDXL/SD UNet and the Flux, SD3 and Wan transformers, not {type(model).__name__}"
    )
