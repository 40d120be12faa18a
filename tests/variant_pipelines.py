"""Tiny pipeline variants built offline from the tiny SDXL and Flux components (no download): img2img, inpaint,
ControlNet, the SDXL refiner layout, IP-Adapters installed in memory, and Flux Fill / Control / Kontext."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image
from transformers import CLIPTextModelWithProjection

from tokred.jobs.testbed import (
    TINY_FLUX_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    clip_tokenizer,
    flux_transformer,
    tiny_clip_config,
    tiny_flux_pipeline,
    tiny_sdxl_pipeline,
    tiny_vae,
    unet_from_config,
)

SIZE = 128


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype("uint8"))


def mask() -> Image.Image:
    return Image.fromarray(((np.arange(SIZE)[None, :].repeat(SIZE, 0) > SIZE // 2) * 255).astype("uint8"))


def _make(cls, base, **over):  # type: ignore[no-untyped-def]
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in {**base.components, **over}.items() if k in params})
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_REFINER_UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 64, 64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": (1, 2, 2, 4),
    "transformer_layers_per_block": 2,
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 5 * 8 + 32,  # 5 time ids (with the aesthetic score) + pooled text
    "norm_num_groups": 8,
}


def _sdxl_ip_adapter_state_dict(unet):  # type: ignore[no-untyped-def]
    """A state dict in the IP-Adapter file layout, from randomly initialised processors (as diffusers' own tests
    make one)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    weights, key_id = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        state = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim)
        state = state.state_dict()
        weights[f"{key_id}.to_k_ip.weight"] = state["to_k_ip.0.weight"]
        weights[f"{key_id}.to_v_ip.weight"] = state["to_v_ip.0.weight"]
        key_id += 2
    dim = unet.config.cross_attention_dim
    projection = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    return {
        "image_proj": {
            "proj.weight": projection["image_embeds.weight"],
            "proj.bias": projection["image_embeds.bias"],
            "norm.weight": projection["norm.weight"],
            "norm.bias": projection["norm.bias"],
        },
        "ip_adapter": weights,
    }


def _flux_ip_adapter_state_dict(transformer, clip_dim: int = 48, tokens: int = 4):  # type: ignore[no-untyped-def]
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    weights, key_id = {}, 0
    for name in transformer.attn_processors:
        if name.startswith("single_transformer_blocks"):
            continue
        state = FluxIPAdapterAttnProcessor(
            hidden_size=transformer.inner_dim,
            cross_attention_dim=transformer.config.joint_attention_dim,
            num_tokens=(tokens,),
        ).state_dict()
        for key in ("to_k_ip", "to_v_ip"):
            weights[f"{key_id}.{key}.weight"] = state[f"{key}.0.weight"]
            weights[f"{key_id}.{key}.bias"] = state[f"{key}.0.bias"]
        key_id += 1
    projection = ImageProjection(
        cross_attention_dim=transformer.config.joint_attention_dim,
        image_embed_dim=clip_dim,
        num_image_text_embeds=tokens,
    ).state_dict()
    return {"image_proj": {k.replace("image_embeds", "proj"): v for k, v in projection.items()}, "ip_adapter": weights}


def _seed(kwargs):  # type: ignore[no-untyped-def]
    return {**kwargs, "generator": torch.Generator().manual_seed(0), "output_type": "np", "num_inference_steps": 2}


def sdxl_variants() -> dict:
    """name -> (pipeline, call keyword arguments)."""
    base = tiny_sdxl_pipeline()
    common = {"prompt": "a cat"}
    variants = {
        "img2img": (_make(StableDiffusionXLImg2ImgPipeline, base), {**common, "image": image(), "strength": 1.0}),
        "inpaint": (
            _make(StableDiffusionXLInpaintPipeline, base),
            {**common, "image": image(), "mask_image": mask(), "height": SIZE, "width": SIZE, "strength": 1.0},
        ),
        "inpaint_9ch": (
            _make(
                StableDiffusionXLInpaintPipeline,
                base,
                unet=unet_from_config({**TINY_SDXL_UNET_CONFIG, "in_channels": 9}),
            ),
            {**common, "image": image(), "mask_image": mask(), "height": SIZE, "width": SIZE, "strength": 1.0},
        ),
    }
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32, 48, 64)).eval()
    variants["controlnet"] = (
        _make(StableDiffusionXLControlNetPipeline, base, controlnet=controlnet),
        {**common, "image": image(), "height": SIZE, "width": SIZE},
    )
    torch.manual_seed(1)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(0.13025),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config()).eval(),
        tokenizer=None,
        tokenizer_2=clip_tokenizer(),
        unet=unet_from_config(TINY_REFINER_UNET_CONFIG),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    refiner.set_progress_bar_config(disable=True)
    variants["refiner"] = (refiner, {**common, "image": image(), "strength": 1.0})
    ip = tiny_sdxl_pipeline()
    ip.unet._load_ip_adapter_weights([_sdxl_ip_adapter_state_dict(ip.unet)])
    embeds = torch.randn(2, 1, ip.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    variants["ip_adapter"] = (ip, {**common, "height": SIZE, "width": SIZE, "ip_adapter_image_embeds": [embeds]})
    return {name: (pipe, _seed(kwargs)) for name, (pipe, kwargs) in variants.items()}


def flux_variants() -> dict:
    base = tiny_flux_pipeline()
    common = {"prompt": "a cat", "max_sequence_length": 16, "height": SIZE, "width": SIZE}
    scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    fill = flux_transformer(TINY_FLUX_CONFIG, in_channels=16 + 16 + scale * scale * 4, out_channels=16)
    control = flux_transformer(TINY_FLUX_CONFIG, in_channels=32, out_channels=16)
    torch.manual_seed(0)
    controlnet = FluxControlNetModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    variants = {
        "img2img": (_make(FluxImg2ImgPipeline, base), {**common, "image": image(), "strength": 1.0}),
        "fill": (_make(FluxFillPipeline, base, transformer=fill), {**common, "image": image(), "mask_image": mask()}),
        "control": (_make(FluxControlPipeline, base, transformer=control), {**common, "control_image": image()}),
        "controlnet": (
            _make(FluxControlNetPipeline, base, controlnet=controlnet),
            {**common, "control_image": image(), "controlnet_conditioning_scale": 0.7},
        ),
        "kontext": (
            _make(FluxKontextPipeline, base),
            {**common, "image": image(), "max_area": SIZE * SIZE, "_auto_resize": False},
        ),
    }
    ip = tiny_flux_pipeline()
    ip.transformer._load_ip_adapter_weights([_flux_ip_adapter_state_dict(ip.transformer)])
    embeds = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(2))
    variants["ip_adapter"] = (
        ip,
        {**common, "ip_adapter_image_embeds": [embeds], "negative_ip_adapter_image_embeds": [torch.zeros(1, 1, 48)]},
    )
    return {name: (pipe, _seed(kwargs)) for name, (pipe, kwargs) in variants.items()}
