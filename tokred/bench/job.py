"""``tokred bench``: every method side by side on one denoiser, measured in one run.

With no config it runs the embedded default: a real-width SDXL-architecture UNet (random weights, transformer
depth reduced so it fits a few CPU minutes) at 1024×1024, where attention matters, comparing the baseline,
``toma``, ``random``, ``grid``, ``todo`` (kv mode) and tomesd when it is installed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tokred.bench.caches import CACHES, split_method
from tokred.bench.compare import Method, Row, compare, format_rows
from tokred.bench.inputs import denoiser_inputs
from tokred.bench.pictures import destinations_picture, speed_plot
from tokred.errors import ConfigError, ConfigIssue, TokredError
from tokred.jobs import sources
from tokred.jobs.results import publish_dir

PEERS = ("baseline", "tomesd")


class BenchConfig(BaseModel):
    """What ``tokred bench`` measures. The defaults are the embedded default run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("random:sdxl", description="a built-in source, a local pipeline directory, or a hub id")
    model_options: dict[str, Any] | None = Field(
        None, description="options of a built-in source (null: random:sdxl runs at depth 2 to fit a CPU)"
    )
    methods: list[str] = Field(
        ["baseline", "toma", "random", "grid", "todo", "tomesd"],
        description="baseline, tomesd, a step cache (fbc, taylorseer, pab, dbcache), or tokred presets, each "
        "optionally with its own settings in brackets (toma[proportional=mask], toma_flux[ratio=0.6,mode=kv]) and "
        "under a cache (toma_flux+fbc); the first must be baseline",
    )
    ratio: float | None = Field(0.5, ge=0.0, lt=1.0, description="ratio for every tokred method (null: each preset's)")
    reduction: dict[str, Any] = Field(
        default_factory=dict,
        description="other reduction settings laid over every tokred method's preset (flat keys such as "
        "sites=[attn1,ff] land here)",
    )
    height: int = Field(1024, ge=32, description="image height (latents are height/8)")
    frames: int = Field(9, ge=1, description="video frames (Wan: latent frames are (frames-1)/4+1)")
    width: int = Field(1024, ge=32)
    batch: int = Field(1, ge=1)
    text_tokens: int = Field(77, ge=1, description="text tokens of the conditioning")
    steps: int = Field(
        1,
        ge=1,
        description="denoiser calls per measured run: 1 is one forward; more runs a flow-matching loop "
        "(step caches such as fbc need several)",
    )
    cache_options: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="settings of the step caches over their defaults, by cache (cache_options.fbc.threshold=0.3)",
    )
    repeats: int = Field(2, ge=1, description="interleaved timed rounds (medians are reported)")
    warmup: int | None = Field(
        None, ge=0, description="untimed rounds before the timed ones (null: none on the CPU, 2 on CUDA)"
    )
    seed: int = 0
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="model dtype: auto is bf16 on CUDA, fp32 on the CPU"
    )


def load_bench_config(source: str | None, overrides: list[str]) -> BenchConfig:
    from tokred.config import list_presets, load_config, merge_layers, reduction_keys, validate_plain

    data = merge_layers([source] if source else [], overrides)
    flat = {key: data.pop(key) for key in list(data) if key in reduction_keys() and key != "ratio"}
    if flat:
        data["reduction"] = {**dict(data.get("reduction") or {}), **flat}
    config = validate_plain(BenchConfig, data)
    if not config.methods or config.methods[0] != "baseline":
        raise ConfigError([ConfigIssue("methods", "must start with baseline", config.methods, True)])
    sources.describe(config.model)
    sources.validate_options(config.model, model_options(config))
    presets = list_presets()
    for index, entry in enumerate(config.methods):
        name, own = parse_method(entry, f"methods.{index}")
        try:
            preset, cache = split_method(name)
        except TokredError as exc:
            raise ConfigError([ConfigIssue(f"methods.{index}", str(exc), entry, True)]) from None
        if cache is not None and preset in PEERS:
            raise ConfigError(
                [ConfigIssue(f"methods.{index}", f"a cache goes alone or under a tokred preset, not {preset}", entry)]
            )
        if cache is not None and config.steps < 2:
            raise ConfigError(
                [ConfigIssue("steps", f"method {entry!r} runs a step cache: it needs steps of 2 or more", 1, True)]
            )
        name = preset if preset is not None else "baseline"
        if name not in PEERS and name not in presets:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"methods.{index}",
                        f"unknown method {name!r}; available: {', '.join([*PEERS, *CACHES, *presets])} "
                        "(a preset and a cache joined by +)",
                        entry,
                        True,
                    )
                ]
            )
        if name not in PEERS:
            try:
                load_config(name, **{**method_overrides(config), **own})
            except ConfigError as exc:
                raise ConfigError(exc.issues, source=f"for method {entry!r}") from None
            except TokredError as exc:
                raise ConfigError([ConfigIssue(f"methods.{index}", str(exc))]) from None
        elif own and preset is None:
            message = f"settings in brackets are a tokred preset's; set the cache's as cache_options.{cache}.<key>"
            raise ConfigError([ConfigIssue(f"methods.{index}", message, entry, True)])
        elif own:
            raise ConfigError([ConfigIssue(f"methods.{index}", f"{name} takes no settings", entry, True)])
    for cache, options in config.cache_options.items():
        if cache not in CACHES:
            raise ConfigError(
                [ConfigIssue(f"cache_options.{cache}", f"unknown cache; available: {', '.join(CACHES)}", cache, True)]
            )
        try:
            CACHES[cache].settings(options)
        except TokredError as exc:
            raise ConfigError([ConfigIssue(f"cache_options.{cache}", str(exc), options, True)]) from None
    if len(set(config.methods)) != len(config.methods):
        raise ConfigError([ConfigIssue("methods", "each method at most once", config.methods, True)])
    return config


def parse_method(entry: str, where: str = "methods") -> tuple[str, dict[str, Any]]:
    """``toma[proportional=mask,ratio=0.6]`` -> ("toma", {"proportional": "mask", "ratio": 0.6})."""
    from tokred.config import parse_overrides

    name, bracket, rest = entry.partition("[")
    if not bracket:
        return entry.strip(), {}
    if not rest.endswith("]"):
        raise ConfigError([ConfigIssue(where, "settings in brackets must end with ']'", entry, True)])
    items, depth, current = [], 0, ""
    for char in rest[:-1]:  # commas inside [...] or {...} belong to a value (locality.size=[4,4])
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items = [item.strip() for item in [*items, current] if item.strip()]
    return name.strip(), parse_overrides(items)


def method_overrides(config: BenchConfig) -> dict[str, Any]:
    """What every tokred method's preset gets laid over it."""
    return {**config.reduction, **({"ratio": config.ratio} if config.ratio is not None else {})}


#: what the built-in real-width sources run at when a bench names no options (CPU-sized)
BENCH_MODEL_OPTIONS = {"random:sdxl": {"depth": 2}, "random:sd3": {"depth": 4}, "random:wan": {"depth": 2}}


def model_options(config: BenchConfig) -> dict[str, Any]:
    if config.model_options is not None:
        return dict(config.model_options)
    return dict(BENCH_MODEL_OPTIONS.get(config.model, {}))


def denoiser_call(model: torch.nn.Module, config: BenchConfig) -> tuple[Callable[[], Any], torch.Tensor]:
    """A call of the denoiser on structured inputs, and the latent to draw destinations over (C, h, w)."""
    return denoiser_inputs(
        model,
        height=config.height,
        width=config.width,
        batch=config.batch,
        text_tokens=config.text_tokens,
        seed=config.seed,
        frames=config.frames,
        steps=config.steps,
    )


def methods_for(config: BenchConfig, model: torch.nn.Module) -> tuple[list[Method], list[str]]:
    from diffusers import UNet2DConditionModel

    methods, notes = [], []
    overrides = method_overrides(config)
    for entry in config.methods:
        name, own = parse_method(entry)
        preset, cache = split_method(name)
        if cache is not None:
            settings = config.cache_options.get(cache, {})
            if CACHES[cache].describe(settings) not in notes:
                notes.append(CACHES[cache].describe(settings))
            common = {"cache": cache, "steps": config.steps, "cache_settings": settings}
            if preset is None:
                methods.append(Method(entry, "cache", **common))
            else:
                methods.append(Method(entry, config=preset, overrides={**overrides, **own}, **common))
        elif name == "baseline":
            methods.append(Method("baseline", "baseline"))
        elif name == "tomesd":
            if importlib.util.find_spec("tomesd") is None:
                notes.append("tomesd: skipped (not installed; pip install tomesd)")
            elif not isinstance(model, UNet2DConditionModel):
                notes.append("tomesd: skipped (it patches UNets only)")
            else:  # its default max_downsample=1 merges nothing on SDXL
                ratio = config.ratio if config.ratio is not None else 0.5
                methods.append(Method("tomesd", "tomesd", config={"ratio": ratio, "max_downsample": 2}))
                notes.append(f"tomesd: ratio {ratio}, max_downsample=2 (merges at 1/2 of the latent size only)")
        else:
            methods.append(Method(entry, config=name, overrides={**overrides, **own}))
    return methods, notes


def run_bench(config: BenchConfig, out_dir: Path, progress: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Run the comparison and write bench.json, bench.csv, bench.txt and the two PNGs into ``out_dir``.

    Results are written to a sibling ``.partial`` directory first and moved into place at the end, so an
    interrupted run never leaves a result that looks complete.
    """
    device, dtype = sources.resolve_device(config.device, config.dtype)
    model = sources.load_denoiser(config.model, model_options(config), seed=config.seed, device=device, dtype=dtype)
    call, latent = denoiser_call(model, config)
    methods, notes = methods_for(config, model)
    warmup = config.warmup if config.warmup is not None else (2 if device.type == "cuda" else 0)
    rows = compare(model, call, methods, repeats=config.repeats, warmup=warmup, progress=progress)
    config = config.model_copy(update={"warmup": warmup})
    return publish_dir(out_dir, lambda partial: _write_report(config, model, call, latent, rows, notes, partial))


def _write_report(config, model, call, latent, rows, notes, partial: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    title = f"{config.model} {config.height}x{config.width}, ratio {config.ratio}"
    picture = destinations_picture(model, call, latent, partial / "toma_destinations.png", config.ratio)
    speed_plot(rows, partial / "speed_vs_deviation.png", title)
    setup = {
        **config.model_dump(),
        "model_options": model_options(config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "notes": notes,
        "destinations_picture": picture,
    }
    report = {"setup": setup, "rows": [row.as_dict() for row in rows]}
    (partial / "bench.json").write_text(json.dumps(report, indent=2))
    with (partial / "bench.csv").open("w", newline="") as handle:
        fields = ["name", "seconds", "speedup", "flop_speedup", "efficiency", "deviation", "plan_share", "tokens_kept"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow(row)
    text = format_report(report)
    (partial / "bench.txt").write_text(text + "\n")
    report["text"] = text
    return report


def _options_text(options: dict[str, Any] | None) -> str:
    return " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else ""


def format_report(report: dict[str, Any]) -> str:
    setup = report["setup"]
    rows = [Row(**{k: v for k, v in row.items() if k in Row.__dataclass_fields__}) for row in report["rows"]]
    head = (
        f"tokred bench: {setup['model']}{_options_text(setup['model_options'])} at {setup['height']}x{setup['width']}, "
        f"batch {setup['batch']}, ratio {setup['ratio']}"
        + (f", {setup['steps']} denoising steps" if setup.get("steps", 1) > 1 else "")
        + f"; {setup['device']} {setup.get('dtype', 'float32')}, "
        f"{setup['threads']} threads, median of {setup['repeats']} interleaved rounds"
        + (f" after {setup['warmup']} warm-up" if setup.get("warmup") else "")
    )
    lines = [head, "", format_rows(rows)]
    lines += [f"note: {note}" for note in setup["notes"]]
    lines.append(
        "speedup: vs the baseline in this run; FLOP model: counted FLOPs ratio; efficiency = speedup / FLOP model; "
        "deviation: relative L2 of the denoiser output (of the final latent with several steps); "
        "plan share: plan building / call time"
    )
    return "\n".join(lines)
