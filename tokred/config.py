"""Run configs: pydantic models are the schema, OmegaConf loads, layers and overrides.

A run config names each part by its registered name, with that part's options beside it::

    ratio: 0.5
    mode: tokens
    selector: {name: toma}
    merge: {name: attention, temperature: 1000}
    locality: {name: tiles, size: [8, 8]}
    schedule: {name: interval, every: 5}

The schema of the part sections depends on which plugins are installed, so the validating model is built
from a :class:`~tokred.registry.Registries` by :func:`run_config_model`.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
)

from tokred.errors import ConfigError, ConfigIssue, TokredError, UnknownPartError
from tokred.registry import Part, Registries

#: config key -> part kind
PART_FIELDS: dict[str, str] = {
    "selector": "selector",
    "merge": "merge_op",
    "locality": "locality",
    "schedule": "schedule",
}
#: the part each section defaults to, when a plugin registers it
DEFAULT_PART_NAMES: dict[str, str] = {
    "selector": "toma",
    "merge": "attention",
    "locality": "global",
    "schedule": "interval",
}

Site = Literal["attn1", "attn2", "ff"]


class RunConfig(BaseModel):
    """What to reduce, how much, and with which parts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of tokens removed at each site (0 <= ratio < 1)")
    mode: Literal["tokens", "kv"] = Field(
        "tokens",
        description="tokens: the sub-layer runs on the merged tokens, then unmerges; kv: only keys/values are reduced",
    )
    sites: tuple[Site, ...] = Field(
        ("attn1",),
        min_length=1,
        description="sub-layers reduced: attn1 (self-attention), attn2 (cross-attention), ff",
    )
    proportional: bool = Field(
        True,
        description="proportional attention: merged keys get log(tokens they stand for) added to their logits",
    )

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

    @field_validator("sites")
    @classmethod
    def _distinct_sites(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({site for site in sites if sites.count(site) > 1})
        if repeated:
            raise ValueError(f"each site at most once; repeated: {', '.join(repeated)}")
        return sites


def _part_tag(value: Any) -> str | None:
    name = value.get("name") if isinstance(value, Mapping) else getattr(value, "name", None)
    return name if isinstance(name, str) else None


def part_options_model(part: Part) -> type[BaseModel]:
    """The part's options model with its ``name`` added, as it appears in a run config."""
    title = "".join(word.capitalize() for word in f"{part.name}_{part.kind}".split("_"))
    return create_model(
        title,
        __base__=part.options,
        __doc__=part.description or None,
        name=(Literal[part.name], Field(part.name, description=f"{part.kind} name")),  # type: ignore[valid-type]
    )


def _nothing_registered(kind: str):  # type: ignore[no-untyped-def]
    def check(value: Any) -> Any:
        if value is not None:
            raise ValueError(f"no {kind} is registered: install a plugin that provides one")
        return value

    return check


def run_config_model(registries: Registries) -> type[RunConfig]:
    """The :class:`RunConfig` subclass whose part sections are the parts registered in ``registries``."""
    cached = registries._cache.get("run_config_model")
    if cached is not None:
        return cached
    fields: dict[str, Any] = {}
    for key, kind in PART_FIELDS.items():
        parts = list(registries[kind])
        if not parts:
            fields[key] = (Annotated[Any, AfterValidator(_nothing_registered(kind))], None)
            continue
        models = {part.name: part_options_model(part) for part in parts}
        members = tuple(Annotated[model, Tag(name)] for name, model in models.items())
        union = Annotated[Union[members], Discriminator(_part_tag)]  # noqa: UP007
        default_name = DEFAULT_PART_NAMES.get(key)
        if default_name in models:
            fields[key] = (union, Field(default_factory=models[default_name], description=f"the {kind}"))
        else:
            fields[key] = (union | None, Field(None, description=f"the {kind} (none by default)"))
    model = create_model("RunConfig", __base__=RunConfig, __doc__=RunConfig.__doc__, **fields)
    registries._cache["run_config_model"] = model
    return model


# --- presets ---------------------------------------------------------------------------------------------


def _preset_dirs(preset_dirs: Sequence[str | Path] | None) -> list[Path]:
    if preset_dirs is not None:
        return [Path(p) for p in preset_dirs]
    return [Path(str(importlib.resources.files("tokred") / "presets"))]


def list_presets(preset_dirs: Sequence[str | Path] | None = None) -> dict[str, Path]:
    """Preset name -> file, for every ``*.yaml`` in the preset directories (the package's by default)."""
    found: dict[str, Path] = {}
    for directory in _preset_dirs(preset_dirs):
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def find_preset(name: str, preset_dirs: Sequence[str | Path] | None = None) -> Path:
    presets = list_presets(preset_dirs)
    if name not in presets:
        raise UnknownPartError("preset", name, list(presets))
    return presets[name]


# --- loading -----------------------------------------------------------------------------------------------

ConfigSource = Union[str, Path, Mapping[str, Any], BaseModel]  # noqa: UP007


def _is_path_like(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text


def _read_source(source: ConfigSource, preset_dirs: Sequence[str | Path] | None) -> tuple[dict[str, Any], str]:
    if isinstance(source, BaseModel):
        return config_to_dict(source), "<config object>"
    if isinstance(source, Mapping):
        return _to_plain(OmegaConf.create(dict(source)), "<mapping>"), "<mapping>"
    text = str(source)
    if isinstance(source, Path) or _is_path_like(text):
        path = Path(text)
        if not path.is_file():
            raise ConfigError([ConfigIssue("", f"no config file at {text!r}")])
    else:
        path = find_preset(text, preset_dirs)
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc}")]) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError([ConfigIssue("", f"{path} must hold a mapping at top level")])
    return _to_plain(loaded, str(path)), str(path)


def _to_plain(cfg: DictConfig, where: str) -> dict[str, Any]:
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError([ConfigIssue("", f"cannot resolve {where}: {exc}")]) from None
    assert isinstance(plain, dict)
    return _normalise_parts(plain)


def _normalise_parts(data: dict[str, Any]) -> dict[str, Any]:
    """``selector: toma`` is short for ``selector: {name: toma}``."""
    for key in PART_FIELDS:
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
    return data


def _layer(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``; a part section naming another part replaces the section whole."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        if key in PART_FIELDS and isinstance(value, Mapping) and isinstance(old, Mapping):
            if "name" in value and value.get("name") != old.get("name"):
                merged[key] = dict(value)
            else:
                merged[key] = {**old, **value}
        elif isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = _plain_merge(old, value)
        else:
            merged[key] = value
    return merged


def _plain_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _plain_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``key=value`` dot-list overrides into a nested mapping (values parsed as YAML by OmegaConf)."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([ConfigIssue("", "an override must look like KEY=VALUE", item, True)])
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError([ConfigIssue(key, f"cannot parse override: {exc}", item, True)]) from None
        assert isinstance(parsed, dict)
        result = _layer(result, _normalise_parts(parsed))
    return result


def merge_layers(
    sources: Sequence[ConfigSource],
    overrides: Iterable[str] = (),
    preset_dirs: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Layer the sources in order, then the overrides, into one plain mapping (not yet validated)."""
    data: dict[str, Any] = {}
    for source in sources:
        layer, _ = _read_source(source, preset_dirs)
        data = _layer(data, layer)
    return _layer(data, parse_overrides(overrides))


def load_config(
    *sources: ConfigSource,
    overrides: Iterable[str] = (),
    registries: Registries | None = None,
    preset_dirs: Sequence[str | Path] | None = None,
    **values: Any,
) -> RunConfig:
    """Load, layer, override and validate a run config.

    Args:
        sources: preset names, YAML paths, mappings or config objects, later ones over earlier ones.
        overrides: ``key=value`` dot-list strings, applied last (``selector=random`` replaces the section).
        registries: the parts to validate against (the installed plugins by default).
        preset_dirs: where presets are looked up (the package's presets by default).
        values: keyword overrides, applied after ``overrides`` (``ratio=0.3``).

    Raises:
        ConfigError: naming the dotted path of every bad field, what was given and what is allowed.
    """
    if registries is None:
        from tokred.plugins import default_registries

        registries = default_registries()
    data = merge_layers(sources, overrides, preset_dirs)
    if values:
        data = _layer(data, _normalise_parts(dict(values)))
    return validate_config(data, registries)


def validate_config(data: Mapping[str, Any], registries: Registries) -> RunConfig:
    """Validate a plain mapping against the run config model of ``registries``.

    A part section with options but no ``name`` (``merge.temperature=5`` alone) applies to the default part.
    """
    model = run_config_model(registries)
    data = dict(data)
    for key, kind in PART_FIELDS.items():
        section, default = data.get(key), DEFAULT_PART_NAMES.get(key)
        if isinstance(section, Mapping) and "name" not in section and default in registries[kind]:
            data[key] = {"name": default, **section}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues(exc, data, registries)) from None


def validate_plain(model: type[BaseModel], data: Mapping[str, Any]) -> Any:
    """Validate ``data`` against a plain pydantic model, with the same people-first errors as run configs."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        issues = []
        for error in exc.errors():
            path = ".".join(str(item) for item in error["loc"])
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(model.model_fields) if len(error["loc"]) == 1 else ""
                issues.append(
                    ConfigIssue(
                        path, f"unknown key {error['loc'][-1]!r}" + (f"; allowed: {allowed}" if allowed else "")
                    )
                )
            elif error["type"] == "missing":
                issues.append(ConfigIssue(path, "required, but missing"))
            else:
                issues.append(ConfigIssue(path, error["msg"].removeprefix("Value error, "), error.get("input"), True))
        raise ConfigError(issues) from None


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """A validated config as plain data, each part section starting with its ``name``."""
    data = config.model_dump(mode="json")
    for key in PART_FIELDS:
        section = data.get(key)
        if isinstance(section, dict) and "name" in section:
            data[key] = {"name": section.pop("name"), **section}
    return data


def config_to_yaml(config: BaseModel) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config)))


# --- errors for people ---------------------------------------------------------------------------------------


def _allowed_keys(loc: list[Any], data: Mapping[str, Any], registries: Registries) -> list[str] | None:
    if len(loc) == 1:
        return list(run_config_model(registries).model_fields)
    if len(loc) == 2 and loc[0] in PART_FIELDS:
        section = data.get(loc[0])
        name = _part_tag(section)
        registry = registries[PART_FIELDS[loc[0]]]
        if name in registry:
            return ["name", *registry.get(name).options.model_fields]
    return None


def _issues(exc: ValidationError, data: Mapping[str, Any], registries: Registries) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        loc = list(error["loc"])
        kind = PART_FIELDS.get(loc[0]) if loc and isinstance(loc[0], str) else None
        if kind and len(loc) >= 2 and loc[1] == _part_tag(data.get(loc[0])):
            del loc[1]  # the union's tag, not a key of the config
        path = ".".join(str(item) for item in loc)
        etype = error["type"]
        given = error.get("input")
        if etype == "union_tag_invalid" and kind:
            tag = error.get("ctx", {}).get("tag")
            unknown = UnknownPartError(kind, str(tag), registries[kind].names())
            issues.append(ConfigIssue(f"{path}.name", str(unknown)))
        elif etype == "union_tag_not_found" and kind:
            names = ", ".join(registries[kind].names())
            issues.append(
                ConfigIssue(path, f"must be a {kind} name or a mapping with 'name'; available: {names}", given, True)
            )
        elif etype == "extra_forbidden":
            allowed = _allowed_keys(loc, data, registries)
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            issues.append(ConfigIssue(path, f"unknown key {loc[-1]!r}{hint}"))
        elif etype == "missing":
            issues.append(ConfigIssue(path, "required, but missing"))
        else:
            issues.append(ConfigIssue(path, error["msg"].removeprefix("Value error, "), given, True))
    return issues


__all__ = [
    "ConfigError",
    "RunConfig",
    "TokredError",
    "config_to_dict",
    "config_to_yaml",
    "list_presets",
    "load_config",
    "merge_layers",
    "parse_overrides",
    "run_config_model",
    "validate_config",
]
