"""Structured inputs for a denoiser's forward: smooth latents and random conditioning, as a ready call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokred.bench.synthetic import smooth_latents, smooth_tokens, smooth_video
from tokred.errors import TokredError


@dataclass
class Denoising:
    """How to call a denoiser on structured inputs: ``forward(latent, sigma)`` with sigma in [0, 1] (mapped to the
    model's own timestep scale), the starting latent, and the latent as (C, h, w) for pictures."""

    model: torch.nn.Module
    forward: Callable[[torch.Tensor, float], Any]
    latent: torch.Tensor
    picture: torch.Tensor

    def loop(self, steps: int) -> torch.Tensor:
        """A flow-matching Euler run of ``steps`` denoiser calls from sigma 1 to 0, each in diffusers' cache context
        (as pipelines call denoisers, so step caches work); stateful hooks are reset at the end, as pipelines do."""
        model = self.model
        before = getattr(model, "_tokred_bench_before_run", None)
        if before is not None:
            before()
        sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        x = self.latent
        context = getattr(model, "cache_context", None)
        for k in range(steps):
            model._tokred_bench_timestep = 1000.0 * sigmas[k]  # for caches that ask the timestep (PAB)
            with context("cond") if context is not None else contextlib.nullcontext():
                out = output_tensor(self.forward(x, sigmas[k]))
            x = x + (sigmas[k + 1] - sigmas[k]) * out
        reset = getattr(model, "_reset_stateful_cache", None)
        if reset is not None:
            reset()
        return x


def output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find a tensor in a {type(output).__name__}")


def denoiser_inputs(
    model: torch.nn.Module,
    *,
    height: int,
    width: int,
    batch: int = 1,
    text_tokens: int = 77,
    seed: int = 0,
    frames: int = 9,
    steps: int = 1,
) -> tuple[Callable[[], Any], torch.Tensor]:
    """A call of ``model`` (SDXL/SD UNet, Flux, SD3 or Wan transformer) on structured inputs for an image of
    height×width (a video of ``frames`` frames for Wan) — one forward at sigma 0.5, or with ``steps`` > 1 a whole
    denoising run — and the latent behind it as (C, h, w) for pictures (a video's first latent frame)."""
    run = denoising(model, height=height, width=width, batch=batch, text_tokens=text_tokens, seed=seed, frames=frames)
    if steps > 1:
        return (lambda: run.loop(steps)), run.picture
    return (lambda: run.forward(run.latent, 0.5)), run.picture


def denoising(
    model: torch.nn.Module, *, height: int, width: int, batch: int, text_tokens: int, seed: int, frames: int
) -> Denoising:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, WanTransformer3DModel

    gen = torch.Generator().manual_seed(seed + 1)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype

    def put(t: torch.Tensor) -> torch.Tensor:  # drawn on the CPU (reproducible), used where the model is
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    def full(value: float) -> torch.Tensor:
        return torch.full((batch,), value, device=device, dtype=dtype)

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

        def unet(x: torch.Tensor, sigma: float) -> Any:
            # sample passed positionally: tomesd 0.1.3 fails on a keyword-only call
            return model(x, torch.tensor(round(1000 * sigma), device=device), text, **kwargs)

        return Denoising(model, unet, latent, latent[0])
    if isinstance(model, FluxTransformer2DModel):
        cfg = model.config
        h, w = height // 16, width // 16
        tokens = put(smooth_tokens((h, w), cfg.in_channels, batch=batch, seed=seed))
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        inputs = {
            "encoder_hidden_states": put(torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=gen)),
            "pooled_projections": put(torch.randn(batch, cfg.pooled_projection_dim, generator=gen)),
            "img_ids": put(ids.reshape(h * w, 3)),
            "txt_ids": put(torch.zeros(text_tokens, 3)),
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = put(torch.full((batch,), 3.5))
        return Denoising(
            model,
            lambda x, sigma: model(hidden_states=x, timestep=full(sigma), **inputs),
            tokens,
            tokens[0].T.reshape(-1, h, w),
        )
    if isinstance(model, SD3Transformer2DModel):  # latents at 1/8 of the image, patches of 2x2
        cfg = model.config
        latent = put(smooth_latents(batch, cfg.in_channels, height // 8, width // 8, seed=seed))
        inputs = {
            "encoder_hidden_states": put(torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=gen)),
            "pooled_projections": put(torch.randn(batch, cfg.pooled_projection_dim, generator=gen)),
        }
        return Denoising(
            model, lambda x, sigma: model(hidden_states=x, timestep=full(1000 * sigma), **inputs), latent, latent[0]
        )
    if isinstance(model, WanTransformer3DModel):  # latents at 1/8 of the frame size, frames 4k+1 -> k+1
        cfg = model.config
        latent_frames = (frames - 1) // 4 + 1
        h, w = height // 8, width // 8
        video = put(smooth_video(batch, cfg.in_channels, latent_frames, h, w, seed=seed))
        text = put(torch.randn(batch, text_tokens, cfg.text_dim, generator=gen))
        return Denoising(
            model,
            lambda x, sigma: model(hidden_states=x, timestep=full(1000 * sigma), encoder_hidden_states=text),
            video,
            video[0, :, 0],
        )
    raise TokredError(
        f"bench handles the SDXL/SD UNet and the Flux, SD3 and Wan transformers, not {type(model).__name__}"
    )
