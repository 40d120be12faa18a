"""``tokred generate``: load a model, apply a reduction config, generate, and record what happened."""

from __future__ import annotations

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
    if config.negative_prompt is not None:
        kwargs["negative_prompt"] = config.negative_prompt
    if config.guidance_scale is not None:
        kwargs["guidance_scale"] = config.guidance_scale
    if type(pipe).__name__.startswith("Flux"):
        kwargs["max_sequence_length"] = 77 if config.model.startswith(("tiny:", "random:")) else 512
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
            images = pipe(**pipeline_kwargs(config, pipe)).images
        seconds = time.perf_counter() - start
    finally:
        if patch is not None:
            patch.remove()
    stats = patch.stats.as_dict() if patch is not None else None
    return images, {"seconds": seconds, "stats": stats}


def write_run(out_dir: Path, config: GenerateSettings, images: list[Any], record: dict[str, Any]) -> Path:
    """PNGs and record.json, published whole into ``out_dir`` (never half-written)."""

    def write(partial: Path) -> Path:
        names = []
        for index, image in enumerate(images):
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


def run_generate(config: GenerateSettings, out_dir: Path) -> dict[str, Any]:
    device, dtype = sources.resolve_device(config.device, config.dtype)
    load_start = time.perf_counter()
    pipe = sources.load_pipeline(config.model, config.model_options, seed=0, dtype=dtype).to(device)
    load_seconds = time.perf_counter() - load_start
    images, record = generate_with(pipe, config)
    record = {**record, "load_seconds": load_seconds, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    write_run(out_dir, config, images, record)
    return record
