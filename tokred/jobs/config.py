"""Job configs: what ``tokred generate``, ``sweep`` and ``bench`` run, each holding a reduction config.

A job config keeps its own settings (model, prompt, steps, ...) at the top and the reduction settings under
``reduction``. For the command line's sake the reduction keys may also be given flat —
``tokred generate toma model=tiny:sdxl steps=2 ratio=0.3`` — and are moved under ``reduction``; a preset name
given as the config (``toma``) is the reduction part. So both of these YAML files mean the same::

    model: tiny:sdxl          model: tiny:sdxl
    steps: 2                  steps: 2
    ratio: 0.3                reduction: {ratio: 0.3}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tokred.config import (
    ConfigSource,
    config_issues,
    fill_default_parts,
    layer,
    normalise_parts,
    parse_overrides,
    read_source,
    reduction_config_model,
    reduction_keys,
    suggest,
)
from tokred.errors import ConfigError, ConfigIssue
from tokred.registry import Registries

J = TypeVar("J", bound=BaseModel)


class GenerateSettings(BaseModel):
    """What ``tokred generate`` (and each sweep item) runs, beside its reduction config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "tiny:sdxl",
        description="model source: tiny:sdxl, tiny:flux, random:sdxl, random:flux, a "
        "local pipeline directory or a hub id",
    )
    model_options: dict[str, Any] = Field(default_factory=dict, description="options of a built-in model source")
    prompt: str | list[str] = Field("a photo of a squirrel in the snow", description="one prompt or a list")
    negative_prompt: str | None = None
    seed: int = Field(0, description="seed of the generator: same seed, same starting noise")
    steps: int = Field(4, ge=1, description="denoising steps")
    height: int | None = Field(None, ge=16, description="image height (the source's default when null)")
    width: int | None = Field(None, ge=16, description="image width (the source's default when null)")
    guidance_scale: float | None = Field(None, description="the pipeline's default when null")
    frames: int | None = Field(None, ge=1, description="video frames (video models; the source's default when null)")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="weights' dtype (local and hub models load in it): auto is bf16 on CUDA, fp32 on the CPU"
    )


def with_reduction(settings: type[J], registries: Registries) -> type[J]:
    """``settings`` plus a ``reduction`` field typed by the reduction config of ``registries``."""
    key = f"job_model:{settings.__qualname__}"
    cached = registries._cache.get(key)
    if cached is None:
        reduction = reduction_config_model(registries)
        name = settings.__name__.removesuffix("Settings") + "Config"
        cached = create_model(
            name,
            __base__=settings,
            __doc__=settings.__doc__,
            reduction=(reduction, Field(default_factory=reduction, description="the reduction config")),
        )
        registries._cache[key] = cached
    return cached


def generate_config_model(registries: Registries) -> type[GenerateSettings]:
    """The generate config: :class:`GenerateSettings` plus ``reduction``."""
    return with_reduction(GenerateSettings, registries)


def nest_reduction(data: Mapping[str, Any], preset_dirs: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Move flat reduction keys under ``reduction``; a ``reduction`` given as a name or path is that config."""
    keys = set(reduction_keys())
    out: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    given = data.get("reduction")
    if isinstance(given, (str, Path)):
        nested = read_source(given, preset_dirs)[0]
    elif isinstance(given, Mapping):
        nested = dict(given)
    for key, value in data.items():
        if key == "reduction":
            continue
        if key in keys:
            nested = layer(nested, {key: value})
        else:
            out[key] = value
    if nested or "reduction" in data:
        out["reduction"] = normalise_parts(nested)
    return out


def merge_job_layers(
    sources: Sequence[ConfigSource],
    overrides: Iterable[str] = (),
    preset_dirs: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Layer job sources (presets are reduction configs; YAML files flat or nested) and overrides."""
    data: dict[str, Any] = {}
    for source in sources:
        data = layer(data, nest_reduction(read_source(source, preset_dirs)[0], preset_dirs))
    return layer(data, nest_reduction(parse_overrides(overrides), preset_dirs))


def validate_job(
    settings: type[J], data: Mapping[str, Any], registries: Registries, *, reduction_required: bool = True
) -> J:
    """Validate a nested job mapping: its own settings and its reduction config, every problem at once.

    Reduction issues keep the paths people type (``ratio``, ``selector.name``), since the command line takes
    them flat; unknown keys list the job's keys and the reduction keys, with the closest one suggested.
    """
    data = dict(data)
    reduction_data = data.pop("reduction", None) or {}
    issues: list[ConfigIssue] = []
    reduction = None
    if reduction_required:
        model = reduction_config_model(registries)
        filled = fill_default_parts(reduction_data, registries)
        try:
            reduction = model.model_validate(filled)
        except ValidationError as exc:
            issues += config_issues(exc, filled, registries, list(model.model_fields))
    try:
        job = settings.model_validate(data)
    except ValidationError as exc:
        allowed = [*settings.model_fields, *reduction_keys()]
        for error in exc.errors():
            path = ".".join(str(item) for item in error["loc"])
            if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
                key = str(error["loc"][0])
                issues.append(
                    ConfigIssue(path, f"unknown key {key!r}{suggest(key, allowed)}; allowed: {', '.join(allowed)}")
                )
            elif error["type"] == "extra_forbidden":
                issues.append(ConfigIssue(path, f"unknown key {error['loc'][-1]!r}"))
            elif error["type"] == "missing":
                issues.append(ConfigIssue(path, "required, but missing"))
            else:
                issues.append(ConfigIssue(path, error["msg"].removeprefix("Value error, "), error.get("input"), True))
    if issues:
        raise ConfigError(issues)
    if not reduction_required:
        return job
    full = with_reduction(settings, registries)
    return full.model_validate({**job.model_dump(), "reduction": reduction})  # type: ignore[return-value]


def load_generate_config(
    *sources: ConfigSource,
    overrides: Iterable[str] = (),
    registries: Registries | None = None,
    preset_dirs: Sequence[str | Path] | None = None,
    **values: Any,
) -> GenerateSettings:
    """Load a generate config: presets / YAML files, then ``key=value`` overrides, then keyword values."""
    if registries is None:
        from tokred.plugins import default_registries

        registries = default_registries()
    data = merge_job_layers(sources, overrides, preset_dirs)
    if values:
        data = layer(data, nest_reduction(normalise_parts(dict(values)), preset_dirs))
    return validate_job(GenerateSettings, data, registries)
