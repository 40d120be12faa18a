"""``tokred generate``: load a model, apply a reduction config, generate, and record what happened."""

from __future__ import annotations

import inspect
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tokred.config import config_to_dict
from tokred.jobs import sources
from tokred.jobs.config import GenerateSettings
from tokred.jobs.results import publish_dir


def versions() -> dict[str, str]:
    import diffusers

    import tokred

    return {
        "tokred": tokred.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def prompts_of(config: GenerateSettings) -> list[str]:
    return [config.prompt] if isinstance(config.prompt, str) else list(config.prompt)


def accepts(pipe: Any, name: str) -> bool:
    """Whether the pipeline's call takes the keyword ``name``."""
    return name in inspect.signature(type(pipe).__call__).parameters


def pipeline_kwargs(config: GenerateSettings, pipe: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": prompts_of(config),
        "num_inference_steps": config.steps,
        "generator": torch.Generator().manual_seed(config.seed),
        "output_type": "pil",
    }
    builtin = sources.BUILTIN_SOURCES.get(config.model)
    height = config.height or (builtin.default_size if builtin else None)  # else the pipeline's own default
    width = config.width or (builtin.default_size if builtin else None)
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    frames = config.frames or (builtin.default_frames if builtin else None)
    if frames is not None and accepts(pipe, "num_frames"):
        kwargs["num_frames"] = frames
    if config.negative_prompt is not None:
        kwargs["negative_prompt"] = config.negative_prompt
    if config.guidance_scale is not None:
        kwargs["guidance_scale"] = config.guidance_scale
    if builtin is not None and accepts(pipe, "max_sequence_length"):
        kwargs["max_sequence_length"] = 77  # the built-ins' in-memory T5 tokenizers: short prompts
    return kwargs


def reduces(config: GenerateSettings) -> bool:
    return config.reduction.ratio > 0  # type: ignore[attr-defined]


def generate_with(pipe: Any, config: GenerateSettings) -> tuple[list[Any], dict[str, Any]]:
    """Generate with ``config`` applied to ``pipe`` (nothing applied at ratio 0: the baseline)."""
    import tokred

    reduction = config.reduction  # type: ignore[attr-defined]
    patch = tokred.apply(pipe, reduction, time_plans=True) if reduces(config) else None
    try:
        start = time.perf_counter()
        with torch.no_grad():
            result = pipe(**pipeline_kwargs(config, pipe))
        images = result.frames if hasattr(result, "frames") else result.images  # a video: a list of frames each
        seconds = time.perf_counter() - start
    finally:
        if patch is not None:
            patch.remove()
    stats = patch.stats.as_dict() if patch is not None else None
    return images, {"seconds": seconds, "stats": stats}


def write_run(out_dir: Path, config: GenerateSettings, images: list[Any], record: dict[str, Any]) -> Path:
    """PNGs (a GIF and a frame strip PNG per video) and record.json, published whole into ``out_dir``."""

    def write(partial: Path) -> Path:
        names = []
        for index, image in enumerate(images):
            if isinstance(image, list):  # a video: its frames
                names += write_video(partial, f"{index:03d}", image)
            else:
                name = f"{index:03d}.png"
                image.save(partial / name)
                names.append(name)
        full = {
            "config": config_to_dict(config),
            "images": names,
            "versions": versions(),
            "seed": config.seed,
            **record,
        }
        (partial / "record.json").write_text(json.dumps(full, indent=2))
        return out_dir

    return publish_dir(out_dir, write)


def write_video(directory: Path, stem: str, frames: list[Any]) -> list[str]:
    """``stem.gif`` (the clip, 8 frames a second) and ``stem_frames.png`` (its frames side by side)."""
    from PIL import Image

    gif, strip = f"{stem}.gif", f"{stem}_frames.png"
    frames[0].save(directory / gif, save_all=True, append_images=frames[1:], duration=125, loop=0)
    width, height = frames[0].size
    sheet = Image.new("RGB", (width * len(frames), height))
    for position, frame in enumerate(frames):
        sheet.paste(frame, (position * width, 0))
    sheet.save(directory / strip)
    return [gif, strip]


def run_generate(config: GenerateSettings, out_dir: Path) -> dict[str, Any]:
    device, dtype = sources.resolve_device(config.device, config.dtype)
    load_start = time.perf_counter()
    pipe = sources.load_pipeline(config.model, config.model_options, seed=0, dtype=dtype).to(device)
    load_seconds = time.perf_counter() - load_start
    images, record = generate_with(pipe, config)
    record = {**record, "load_seconds": load_seconds, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    write_run(out_dir, config, images, record)
    return record
