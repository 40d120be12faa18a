"""Real diffusers architectures built from configs, with random weights: no download needed.

``sdxl_unet_config()`` is the UNet config of Stable Diffusion XL base 1.0; the tiny builders keep the real
layouts (SDXL: attention at 1/2 and 1/4 of the latent size; SD 1.x: at every level) at test widths.
"""

from __future__ import annotations

import string
from typing import Any

import torch

SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": (1, 2, 4),
    "transformer_layers_per_block": (1, 2, 3),
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
}

TINY_SD1_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def built_on(device: torch.device | str | None, dtype: torch.dtype, build):  # type: ignore[no-untyped-def]
    """``build()`` with its parameters made on ``device`` (random weights drawn there: a 12B-parameter model
    is made in seconds on a GPU, and never passes through host memory), then cast to ``dtype``."""
    with torch.device(device or "cpu"):
        model = build().eval()
    return model if dtype == torch.float32 else model.to(dtype)


def model_from_config(  # type: ignore[no-untyped-def]
    class_name: str, config: dict[str, Any], *, seed: int, dtype: torch.dtype, device: Any, **changes: Any
):
    """diffusers' ``class_name`` built from ``config`` (with ``changes``), random weights seeded with ``seed``."""
    import diffusers

    torch.manual_seed(seed)
    return built_on(device, dtype, lambda: getattr(diffusers, class_name)(**{**config, **changes}))


def unet_from_config(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None
):
    return model_from_config("UNet2DConditionModel", config, seed=seed, dtype=dtype, device=device)


def tiny_vae(scaling_factor: float, shift_factor: float | None = None, latent_channels: int = 4):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=256,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def clip_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level CLIP tokenizer built in memory: one token per character."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(chars)})  # one id per character (and per word-final character)
    vocab.update({c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -4.0) for c in string.ascii_letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_clip_config(hidden: int = 32):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )


def t5_encoder(*, d_model: int, d_ff: int, d_kv: int, num_layers: int, num_heads: int):  # type: ignore[no-untyped-def]
    """A T5 text encoder with the in-memory tokenizer's vocabulary (random weights)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=1000,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_sdxl_pipeline(*, text_encoders: bool = True, seed: int = 0):  # type: ignore[no-untyped-def]
    """A StableDiffusionXLPipeline with the SDXL layout at test widths (about 1 s for 2 steps at 256 px)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = unet_from_config(TINY_SDXL_UNET_CONFIG, seed=seed)
    te1 = te2 = tok1 = tok2 = None
    if text_encoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed + 1)
        te1, te2 = CLIPTextModel(tiny_clip_config()).eval(), CLIPTextModelWithProjection(tiny_clip_config()).eval()
        tok1, tok2 = clip_tokenizer(), clip_tokenizer()
    torch.manual_seed(seed + 2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025),
        unet=unet,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 4, 8),
}

#: FLUX.1-dev's transformer: 19 double and 38 single blocks, 24 heads × 128
FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def flux_transformer(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None, **changes: Any
):
    """A FluxTransformer2DModel from ``config`` (with ``changes``, e.g. fewer layers), random weights."""
    return model_from_config("FluxTransformer2DModel", config, seed=seed, dtype=dtype, device=device, **changes)


def tiny_flux_pipeline(*, text_encoders: bool = True, seed: int = 0):  # type: ignore[no-untyped-def]
    """A FluxPipeline with the Flux layout at test widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = flux_transformer(TINY_FLUX_CONFIG, seed=seed)
    te1 = te2 = tok1 = tok2 = None
    if text_encoders:
        from transformers import CLIPTextModel

        torch.manual_seed(seed + 1)
        te1 = CLIPTextModel(tiny_clip_config()).eval()
        te2 = t5_encoder(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
        tok1, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed + 2)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(0.3611, 0.1159),
        transformer=transformer,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- SD3 / SD3.5 --------------------------------------------------------------------------------------------------

#: SD3.5-medium-like at test widths: dual attention in block 0, RMS qk-norm
TINY_SD3_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 4,
    "pos_embed_max_size": 48,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}

#: Stable Diffusion 3.5 large's transformer (38 joint blocks, 38 heads x 64)
SD35_LARGE_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
    "qk_norm": "rms_norm",
}


def sd3_transformer(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None, **changes: Any
):
    return model_from_config("SD3Transformer2DModel", config, seed=seed, dtype=dtype, device=device, **changes)


def tiny_sd3_pipeline(*, seed: int = 0):  # type: ignore[no-untyped-def]
    """A StableDiffusion3Pipeline with the SD3.5 layout at test widths and offline text encoders (two CLIPs, T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = sd3_transformer(TINY_SD3_CONFIG, seed=seed)
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModelWithProjection(tiny_clip_config()).eval()
    te2 = CLIPTextModelWithProjection(tiny_clip_config()).eval()
    te3 = t5_encoder(d_model=64, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
    torch.manual_seed(seed + 2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(1.5035, 0.0609),
        text_encoder=te1,
        tokenizer=clip_tokenizer(),
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=te3,
        tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- Flux.2 ---------------------------------------------------------------------------------------------------------

TINY_FLUX2_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "timestep_guidance_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "rope_theta": 2000,
    "guidance_embeds": True,
}

#: FLUX.2-dev's transformer: 8 double and 48 single blocks, 48 heads x 128
FLUX2_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
}


def flux2_transformer(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None, **changes: Any
):
    return model_from_config("Flux2Transformer2DModel", config, seed=seed, dtype=dtype, device=device, **changes)


def tiny_flux2_pipeline(*, seed: int = 0):  # type: ignore[no-untyped-def]
    """A Flux2Pipeline at test widths, without a text encoder: call it with ``prompt_embeds`` (B, L, 24)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    transformer = flux2_transformer(TINY_FLUX2_CONFIG, seed=seed)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- QwenImage ------------------------------------------------------------------------------------------------------

TINY_QWEN_IMAGE_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}


def qwen_image_transformer(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None, **changes: Any
):
    return model_from_config("QwenImageTransformer2DModel", config, seed=seed, dtype=dtype, device=device, **changes)


def tiny_qwen_image_pipeline(*, seed: int = 0):  # type: ignore[no-untyped-def]
    """A QwenImagePipeline at test widths, without a text encoder: call it with ``prompt_embeds`` (B, L, 24) and
    ``prompt_embeds_mask``."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = qwen_image_transformer(TINY_QWEN_IMAGE_CONFIG, seed=seed)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- Wan 2.x (video) ---------------------------------------------------------------------------------------------

TINY_WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}

#: Wan 2.1 text-to-video 14B's transformer: 40 blocks, 40 heads x 128
WAN21_14B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def wan_transformer(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None, **changes: Any
):
    return model_from_config("WanTransformer3DModel", config, seed=seed, dtype=dtype, device=device, **changes)


def tiny_wan_vae(z_dim: int = 4):  # type: ignore[no-untyped-def]
    """A Wan video VAE at test widths: 4x spatial, 4x temporal compression (frames 4k+1 -> k+1 latent frames)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        scale_factor_temporal=2,
        scale_factor_spatial=4,
    ).eval()


def tiny_wan_pipeline(*, seed: int = 0):  # type: ignore[no-untyped-def]
    """A WanPipeline at test widths with an offline UMT5 text encoder (prompt strings work)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = wan_transformer(TINY_WAN_CONFIG, seed=seed)
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=1000,
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
