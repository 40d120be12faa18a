"""Model sources: a hub id or local directory (``from_pretrained``), or a built-in offline source.

Built-ins need no download: ``tiny:sdxl`` and ``tiny:flux`` (test-size, real layouts), ``random:sdxl`` and
``random:flux`` (real-architecture widths with random weights, sized by options such as depth so that a run
fits the machine).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError

from tokred.errors import ConfigError, ConfigIssue, TokredError
from tokred.registry import NoOptions, Options


class RandomSDXLOptions(Options):
    depth: int = Field(10, ge=1, le=10, description="transformer layers per block at most (SDXL: 1, 2, 10)")


class RandomFluxOptions(Options):
    double: int = Field(2, ge=0, le=19, description="double blocks (FLUX.1: 19)")
    single: int = Field(4, ge=0, le=38, description="single blocks (FLUX.1: 38)")


class RandomSD3Options(Options):
    depth: int = Field(38, ge=1, le=38, description="joint blocks (SD3.5 large: 38)")


class RandomWanOptions(Options):
    depth: int = Field(40, ge=1, le=40, description="blocks (Wan 2.1 14B: 40)")


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    family: str  # sdxl | flux | sd3 | wan
    description: str
    options: type[Options]
    default_size: int
    default_frames: int | None = None  # video sources


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    source.name: source
    for source in (
        BuiltinSource("tiny:sdxl", "sdxl", "SDXL layout at test widths (seconds on a CPU)", NoOptions, 256),
        BuiltinSource("tiny:flux", "flux", "Flux layout at test widths (seconds on a CPU)", NoOptions, 256),
        BuiltinSource(
            "random:sdxl",
            "sdxl",
            "the SDXL UNet's real config, random weights; option depth",
            RandomSDXLOptions,
            1024,
        ),
        BuiltinSource(
            "random:flux",
            "flux",
            "FLUX.1 width (24 heads x 128), random weights; options double, single",
            RandomFluxOptions,
            1024,
        ),
        BuiltinSource("tiny:sd3", "sd3", "SD3.5 layout at test widths (seconds on a CPU)", NoOptions, 128),
        BuiltinSource(
            "random:sd3",
            "sd3",
            "SD3.5 large's transformer config, random weights; option depth",
            RandomSD3Options,
            1024,
        ),
        BuiltinSource("tiny:wan", "wan", "Wan 2.x video layout at test widths (seconds on a CPU)", NoOptions, 64, 9),
        BuiltinSource(
            "random:wan",
            "wan",
            "Wan 2.1 14B's transformer config, random weights; option depth (frames: the job's frames)",
            RandomWanOptions,
            480,
            81,
        ),
    )
}


def _unknown(name: str) -> TokredError:
    built_ins = ", ".join(BUILTIN_SOURCES)
    return TokredError(
        f"unknown model source {name!r}: not a built-in ({built_ins}), not a local directory, and not a hub id "
        "(owner/name)"
    )


def describe(name: str) -> str:
    """'builtin', 'local' or 'hub' — or an error listing the built-ins."""
    if name in BUILTIN_SOURCES:
        return "builtin"
    if ":" in name and not os.path.exists(name):
        raise _unknown(name)
    if os.path.isdir(name):
        return "local"
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/")):
        return "hub"
    raise _unknown(name)


def validate_options(name: str, options: dict[str, Any]) -> Options:
    source = BUILTIN_SOURCES.get(name)
    model = source.options if source else NoOptions
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        issues = [
            ConfigIssue("model_options." + ".".join(str(p) for p in e["loc"]), e["msg"], e.get("input"), True)
            for e in exc.errors()
        ]
        raise ConfigError(issues) from None


def default_size(name: str) -> int:
    source = BUILTIN_SOURCES.get(name)
    return source.default_size if source else 1024


# --- building ------------------------------------------------------------------------------------------------


def _sdxl_text_encoders(hidden: tuple[int, int], seed: int):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tokred.jobs.testbed import tiny_clip_config

    torch.manual_seed(seed)
    first = tiny_clip_config(hidden[0])
    second = tiny_clip_config(hidden[1])
    second.projection_dim = hidden[1]
    return CLIPTextModel(first).eval(), CLIPTextModelWithProjection(second).eval()


def _random_sdxl_pipeline(options: RandomSDXLOptions, seed: int):  # type: ignore[no-untyped-def]
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from tokred.jobs.testbed import clip_tokenizer, tiny_vae

    unet = random_sdxl_unet(options, seed)
    te1, te2 = _sdxl_text_encoders((768, 1280), seed + 1)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025),
        unet=unet,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
    )


def random_sdxl_unet(options: RandomSDXLOptions, seed: int = 0, **where: Any):  # type: ignore[no-untyped-def]
    from tokred.jobs.testbed import SDXL_UNET_CONFIG, unet_from_config

    layers = [min(n, options.depth) for n in SDXL_UNET_CONFIG["transformer_layers_per_block"]]
    return unet_from_config({**SDXL_UNET_CONFIG, "transformer_layers_per_block": layers}, seed=seed, **where)


def random_flux_transformer(options: RandomFluxOptions, seed: int = 0, **where: Any):  # type: ignore[no-untyped-def]
    from tokred.jobs.testbed import FLUX_DEV_CONFIG, flux_transformer

    return flux_transformer(
        FLUX_DEV_CONFIG, seed=seed, num_layers=options.double, num_single_layers=options.single, **where
    )


def _random_flux_pipeline(options: RandomFluxOptions, seed: int):  # type: ignore[no-untyped-def]
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    from tokred.jobs.testbed import clip_tokenizer, t5_encoder, t5_tokenizer, tiny_clip_config, tiny_vae

    transformer = random_flux_transformer(options, seed)
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(tiny_clip_config(768)).eval()
    t5 = t5_encoder(d_model=4096, d_ff=64, d_kv=64, num_layers=1, num_heads=2)  # FLUX.1 width, one layer
    vae = tiny_vae(0.3611, 0.1159, latent_channels=16)  # FLUX.1's VAE has 16 latent channels
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        transformer=transformer,
        text_encoder=clip,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(),
    )


DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` device: CUDA when there is one, else the CPU; ``auto`` dtype: bf16 on CUDA, fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise TokredError(f"device: not a device: {device!r} (cpu, cuda, cuda:N or auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TokredError("device: cuda was asked for, but torch sees no CUDA device here")
    if dtype != "auto" and dtype not in DTYPES:
        raise TokredError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    chosen = DTYPES.get(dtype) or (torch.bfloat16 if resolved.type == "cuda" else torch.float32)
    return resolved, chosen


def random_sd3_transformer(options: RandomSD3Options, seed: int = 0, **where: Any):  # type: ignore[no-untyped-def]
    from tokred.jobs.testbed import SD35_LARGE_CONFIG, sd3_transformer

    return sd3_transformer(SD35_LARGE_CONFIG, seed=seed, num_layers=options.depth, **where)


def random_wan_transformer(options: RandomWanOptions, seed: int = 0, **where: Any):  # type: ignore[no-untyped-def]
    from tokred.jobs.testbed import WAN21_14B_CONFIG, wan_transformer

    return wan_transformer(WAN21_14B_CONFIG, seed=seed, num_layers=options.depth, **where)


def _random_sd3_pipeline(options: RandomSD3Options, seed: int):  # type: ignore[no-untyped-def]
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from tokred.jobs.testbed import clip_tokenizer, t5_encoder, t5_tokenizer, tiny_clip_config, tiny_vae

    transformer = random_sd3_transformer(options, seed)
    torch.manual_seed(seed + 1)
    clips = []
    for hidden in (768, 1280):  # CLIP-L and CLIP-G widths: pooled 768 + 1280 = the transformer's 2048
        config = tiny_clip_config(hidden)
        config.projection_dim = hidden
        clips.append(CLIPTextModelWithProjection(config).eval())
    t5 = t5_encoder(d_model=4096, d_ff=64, d_kv=64, num_layers=1, num_heads=2)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(1.5035, 0.0609, latent_channels=16),
        text_encoder=clips[0],
        tokenizer=clip_tokenizer(),
        text_encoder_2=clips[1],
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer(),
    )


def _random_wan_pipeline(options: RandomWanOptions, seed: int):  # type: ignore[no-untyped-def]
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from tokred.jobs.testbed import t5_tokenizer, tiny_wan_vae

    transformer = random_wan_transformer(options, seed)
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=1000,
            d_model=4096,
            d_ff=64,
            d_kv=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        vae=tiny_wan_vae(z_dim=16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def load_pipeline(  # type: ignore[no-untyped-def]
    name: str, options: dict[str, Any] | None = None, *, seed: int = 0, dtype: torch.dtype | None = None
):
    """The pipeline of a model source (random weights seeded with ``seed`` for built-ins), in ``dtype`` when given:
    local and hub pipelines load their weights in it directly."""
    kind = describe(name)
    validated = validate_options(name, dict(options or {}))
    if kind == "builtin":
        from tokred.jobs import testbed

        builders: dict[str, Callable[[], Any]] = {
            "tiny:sdxl": lambda: testbed.tiny_sdxl_pipeline(seed=seed),
            "tiny:flux": lambda: testbed.tiny_flux_pipeline(seed=seed),
            "random:sdxl": lambda: _random_sdxl_pipeline(validated, seed),  # type: ignore[arg-type]
            "random:flux": lambda: _random_flux_pipeline(validated, seed),  # type: ignore[arg-type]
            "tiny:sd3": lambda: testbed.tiny_sd3_pipeline(seed=seed),
            "tiny:wan": lambda: testbed.tiny_wan_pipeline(seed=seed),
            "random:sd3": lambda: _random_sd3_pipeline(validated, seed),  # type: ignore[arg-type]
            "random:wan": lambda: _random_wan_pipeline(validated, seed),  # type: ignore[arg-type]
        }
        pipe = builders[name]()
        if dtype is not None and dtype != torch.float32:  # built-ins are made in float32
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(name, **({"torch_dtype": dtype} if dtype is not None else {}))
        except Exception as exc:  # offline, missing files, not a pipeline: say which and why
            where = "the local directory" if kind == "local" else "the hub"
            raise TokredError(f"could not load {name!r} from {where}: {type(exc).__name__}: {exc}") from None
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def load_denoiser(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Only the denoiser of a source (what ``bench`` measures), on ``device`` in ``dtype``; built-ins skip text
    encoders and VAE and draw their random weights on ``device``."""
    validated = validate_options(name, dict(options or {}))
    where = {"device": device, "dtype": dtype}
    if name == "random:sdxl":
        return random_sdxl_unet(validated, seed, **where)  # type: ignore[arg-type]
    if name == "random:flux":
        return random_flux_transformer(validated, seed, **where)  # type: ignore[arg-type]
    if name == "tiny:sdxl":
        from tokred.jobs.testbed import TINY_SDXL_UNET_CONFIG, unet_from_config

        return unet_from_config(TINY_SDXL_UNET_CONFIG, seed=seed, **where)
    if name == "tiny:flux":
        from tokred.jobs.testbed import TINY_FLUX_CONFIG, flux_transformer

        return flux_transformer(TINY_FLUX_CONFIG, seed=seed, **where)
    if name == "random:sd3":
        return random_sd3_transformer(validated, seed, **where)  # type: ignore[arg-type]
    if name == "random:wan":
        return random_wan_transformer(validated, seed, **where)  # type: ignore[arg-type]
    if name == "tiny:sd3":
        from tokred.jobs.testbed import TINY_SD3_CONFIG, sd3_transformer

        return sd3_transformer(TINY_SD3_CONFIG, seed=seed, **where)
    if name == "tiny:wan":
        from tokred.jobs.testbed import TINY_WAN_CONFIG, wan_transformer

        return wan_transformer(TINY_WAN_CONFIG, seed=seed, **where)
    pipe = load_pipeline(name, options, seed=seed, dtype=dtype)
    from tokred.api import find_denoiser

    return find_denoiser(pipe).to(device or "cpu")


def saved_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()
