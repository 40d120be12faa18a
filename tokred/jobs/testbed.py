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


def unet_from_config(  # type: ignore[no-untyped-def]
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = None
):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return built_on(device, dtype, lambda: UNet2DConditionModel(**config))


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
    vocab.update({c: len(vocab) for c in chars})
    vocab.update({c + "</w>": len(vocab) for c in chars})
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
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return built_on(device, dtype, lambda: FluxTransformer2DModel(**{**config, **changes}))


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
