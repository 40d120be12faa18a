"""Reduction configs: what ``apply``, ``patched``, ``make_plan`` and the presets take.

A reduction config says how much to reduce, where, and with which registered parts, each named by its
registered name with that part's options beside it::

    ratio: 0.5
    mode: tokens
    selector: {name: toma}
    merge: {name: attention, temperature: 1000}
    locality: {name: tiles, size: [8, 8]}
    schedule: {name: interval, every: 5}

It holds reduction settings only. What a job runs (model, prompt, steps, ...) lives in the job configs of
:mod:`tokred.jobs`, each of which holds one reduction config. Pydantic models are the schema; OmegaConf loads,
layers and applies ``key=value`` overrides. The part sections depend on which plugins are installed, so the
validating model is built from a :class:`~tokred.registry.Registries` by :func:`reduction_config_model`.
"""

from __future__ import annotations

import difflib
import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
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
    "locality": "tiles",
    "schedule": "interval",
}

#: settings that belong to a job, not to a reduction: key -> what the key is (for errors that say so)
JOB_SETTINGS: dict[str, str] = {
    **dict.fromkeys(
        (
            "model",
            "model_options",
            "prompt",
            "negative_prompt",
            "seed",
            "steps",
            "height",
            "width",
            "guidance_scale",
            "frames",
            "images",
            "device",
            "dtype",
        ),
        "a generation setting (give it to the pipeline call, or to `tokred generate`)",
    ),
    **dict.fromkeys(("methods", "repeats", "batch", "text_tokens", "warmup"), "a bench setting (`tokred bench`)"),
    **dict.fromkeys(("grid", "run"), "a sweep setting (`tokred sweep`)"),
}

Site = Literal["attn1", "attn2", "ff"]


class ReductionConfig(BaseModel):
    """How much to reduce, where, and with which parts: everything ``tokred.apply`` takes, nothing else."""

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
    proportional: Literal["auto", "fold", "mask", "flex", "off"] = Field(
        "auto",
        description="proportional attention (merged keys get log(tokens they stand for) added to their logits): "
        "auto (fold where the attention backend takes it, else mask, else off with a warning), fold (one extra "
        "head channel, no mask: flash kernels stay eligible), mask (an additive mask), flex (FlexAttention "
        "score_mod), off; true means auto and false off",
    )

    @field_validator("proportional", mode="before")
    @classmethod
    def _proportional_bools(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value

    @field_validator("sites")
    @classmethod
    def _distinct_sites(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({site for site in sites if sites.count(site) > 1})
        if repeated:
            raise ValueError(f"each site at most once; repeated: {', '.join(repeated)}")
        return sites


#: every top-level key of a reduction config
def reduction_keys() -> tuple[str, ...]:
    return (*ReductionConfig.model_fields, *PART_FIELDS, "adapter")


def _part_tag(value: Any) -> str | None:
    name = value.get("name") if isinstance(value, Mapping) else getattr(value, "name", None)
    return name if isinstance(name, str) else None


def part_options_model(part: Part) -> type[BaseModel]:
    """The part's options model with its ``name`` added, as it appears in a config."""
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


def _part_union(parts: list[Part]) -> Any:
    models = {part.name: part_options_model(part) for part in parts}
    members = tuple(Annotated[model, Tag(name)] for name, model in models.items())
    return Annotated[Union[members], Discriminator(_part_tag)], models  # noqa: UP007


def reduction_config_model(registries: Registries) -> type[ReductionConfig]:
    """The :class:`ReductionConfig` subclass whose part sections are the parts registered in ``registries``.

    Besides ``selector``, ``merge``, ``locality`` and ``schedule`` it has an optional ``adapter`` section:
    ``{name: flux, ...options}`` forces that adapter and sets its options; left out, the adapter is found from
    the model and takes its default options.
    """
    cached = registries._cache.get("reduction_config_model")
    if cached is not None:
        return cached
    fields: dict[str, Any] = {}
    for key, kind in PART_FIELDS.items():
        parts = list(registries[kind])
        if not parts:
            fields[key] = (Annotated[Any, AfterValidator(_nothing_registered(kind))], None)
            continue
        union, models = _part_union(parts)
        default_name = DEFAULT_PART_NAMES.get(key)
        if default_name in models:
            fields[key] = (union, Field(default_factory=models[default_name], description=f"the {kind}"))
        else:
            fields[key] = (union | None, Field(None, description=f"the {kind} (none by default)"))
    adapters = list(registries["adapter"])
    if adapters:
        union, _ = _part_union(adapters)
        fields["adapter"] = (
            union | None,
            Field(None, description="the adapter and its options (null: found from the model, default options)"),
        )
    else:
        fields["adapter"] = (Annotated[Any, AfterValidator(_nothing_registered("adapter"))], None)
    model = create_model("ReductionConfig", __base__=ReductionConfig, __doc__=ReductionConfig.__doc__, **fields)
    registries._cache["reduction_config_model"] = model
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

#: where part sections may sit: at the top of a reduction config, or under a job config's ``reduction``
_PART_PARENTS: frozenset[tuple[str, ...]] = frozenset({(), ("reduction",)})


def _is_path_like(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text


def read_source(source: ConfigSource, preset_dirs: Sequence[str | Path] | None = None) -> tuple[dict[str, Any], str]:
    """One config source as plain data (part shorthands expanded), and a name for it in messages."""
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
    return normalise_parts(plain)


def normalise_parts(data: dict[str, Any]) -> dict[str, Any]:
    """``selector: toma`` is short for ``selector: {name: toma}`` (also under a job's ``reduction``)."""
    for key in (*PART_FIELDS, "adapter"):
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
    nested = data.get("reduction")
    if isinstance(nested, dict):
        normalise_parts(nested)
    return data


def layer(base: Mapping[str, Any], top: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge ``top`` over ``base`` key by key; a part section naming another part replaces the section whole."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        is_part = key in (*PART_FIELDS, "adapter") and path in _PART_PARENTS
        if is_part and isinstance(value, Mapping) and isinstance(old, Mapping):
            if "name" in value and value.get("name") != old.get("name"):
                merged[key] = dict(value)
            else:
                merged[key] = {**old, **value}
        elif isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = layer(old, value, (*path, key))
        else:
            merged[key] = value
    return merged


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
        except yaml.YAMLError as exc:  # OmegaConf lets the YAML parser's errors through
            where = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                [
                    ConfigIssue(
                        key,
                        f"cannot parse the value as YAML ({where}); quote list items that hold brackets or commas: "
                        "methods='[baseline,\"toma[ratio=0.6]\"]'",
                        item,
                        True,
                    )
                ]
            ) from None
        assert isinstance(parsed, dict)
        result = layer(result, normalise_parts(parsed))
    return result


def merge_layers(
    sources: Sequence[ConfigSource],
    overrides: Iterable[str] = (),
    preset_dirs: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Layer the sources in order, then the overrides, into one plain mapping (not yet validated)."""
    data: dict[str, Any] = {}
    for source in sources:
        data = layer(data, read_source(source, preset_dirs)[0])
    return layer(data, parse_overrides(overrides))


def _default_registries(registries: Registries | None) -> Registries:
    if registries is not None:
        return registries
    from tokred.plugins import default_registries

    return default_registries()


def load_config(
    *sources: ConfigSource,
    overrides: Iterable[str] = (),
    registries: Registries | None = None,
    preset_dirs: Sequence[str | Path] | None = None,
    **values: Any,
) -> ReductionConfig:
    """Load, layer, override and validate a reduction config.

    Args:
        sources: preset names, YAML paths, mappings or config objects, later ones over earlier ones.
        overrides: ``key=value`` dot-list strings, applied last (``selector=random`` replaces the section).
        registries: the parts to validate against (the installed plugins by default).
        preset_dirs: where presets are looked up (the package's presets by default).
        values: keyword overrides, applied after ``overrides`` (``ratio=0.3``).

    Raises:
        ConfigError: naming the dotted path of every bad field, what was given and what is allowed; a job
            setting (``steps``, ``prompt``, ...) is refused with a message saying what it is.
    """
    registries = _default_registries(registries)
    data = merge_layers(sources, overrides, preset_dirs)
    if values:
        data = layer(data, normalise_parts(dict(values)))
    return validate_config(data, registries)


def fill_default_parts(data: Mapping[str, Any], registries: Registries) -> dict[str, Any]:
    """A part section with options but no ``name`` (``merge.temperature=5`` alone) is the default part's."""
    data = dict(data)
    for key, kind in PART_FIELDS.items():
        section, default = data.get(key), DEFAULT_PART_NAMES.get(key)
        if isinstance(section, Mapping) and "name" not in section and default in registries[kind]:
            data[key] = {"name": default, **section}
    return data


def validate_config(data: Mapping[str, Any], registries: Registries) -> ReductionConfig:
    """Validate a plain mapping against the reduction config model of ``registries``."""
    model = reduction_config_model(registries)
    data = fill_default_parts(data, registries)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(config_issues(exc, data, registries, list(model.model_fields))) from None


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """A validated config as plain data, each part section starting with its ``name``."""
    return _name_first(config.model_dump(mode="json"))


def _name_first(data: dict[str, Any]) -> dict[str, Any]:
    for key in (*PART_FIELDS, "adapter"):
        section = data.get(key)
        if isinstance(section, dict) and "name" in section:
            data[key] = {"name": section.pop("name"), **section}
    if isinstance(data.get("reduction"), dict):
        _name_first(data["reduction"])
    return data


def config_to_yaml(config: BaseModel) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config)))


# --- errors for people ---------------------------------------------------------------------------------------


def suggest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_message(key: str, allowed: Sequence[str], *, job_keys: bool = True) -> str:
    """What to say of an unknown key: what it is when it belongs elsewhere, else the closest allowed keys."""
    if job_keys and key in JOB_SETTINGS:
        return f"{key!r} is {JOB_SETTINGS[key]}, not a reduction setting; reduction settings: {', '.join(allowed)}"
    return f"unknown key {key!r}{suggest(key, allowed)}; allowed: {', '.join(allowed)}"


def _part_keys(loc: list[Any], data: Mapping[str, Any], registries: Registries) -> list[str] | None:
    if len(loc) == 2 and loc[0] in (*PART_FIELDS, "adapter"):
        name = _part_tag(data.get(loc[0]))
        registry = registries[PART_FIELDS.get(loc[0], "adapter")]
        if name in registry:
            return ["name", *registry.get(name).options.model_fields]
    return None


def config_issues(
    exc: ValidationError, data: Mapping[str, Any], registries: Registries, top_keys: Sequence[str]
) -> list[ConfigIssue]:
    """People-first issues of a failed reduction-config validation (``top_keys``: the keys allowed at top)."""
    issues = []
    for error in exc.errors():
        loc = list(error["loc"])
        key = loc[0] if loc and isinstance(loc[0], str) else None
        kind = PART_FIELDS.get(key, "adapter" if key == "adapter" else None) if key else None  # type: ignore[arg-type]
        if kind and len(loc) >= 2 and loc[1] == _part_tag(data.get(key)):  # type: ignore[arg-type]
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
            if len(loc) == 1:
                issues.append(ConfigIssue(path, unknown_key_message(str(loc[0]), top_keys)))
            else:
                allowed = _part_keys(loc, data, registries)
                hint = f"{suggest(str(loc[-1]), allowed)}; allowed: {', '.join(allowed)}" if allowed else ""
                issues.append(ConfigIssue(path, f"unknown key {loc[-1]!r}{hint}"))
        elif etype == "missing":
            issues.append(ConfigIssue(path, "required, but missing"))
        else:
            issues.append(ConfigIssue(path, error["msg"].removeprefix("Value error, "), given, True))
    return issues


def validate_plain(model: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> Any:
    """Validate ``data`` against a plain pydantic model, with the same people-first errors as reduction configs."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(plain_issues(exc, model, prefix)) from None


def plain_issues(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        path = prefix + ".".join(str(item) for item in error["loc"])
        if error["type"] == "extra_forbidden":
            key = str(error["loc"][-1])
            if len(error["loc"]) == 1:
                issues.append(ConfigIssue(path, unknown_key_message(key, list(model.model_fields), job_keys=False)))
            else:
                issues.append(ConfigIssue(path, f"unknown key {key!r}"))
        elif error["type"] == "missing":
            issues.append(ConfigIssue(path, "required, but missing"))
        else:
            issues.append(ConfigIssue(path, error["msg"].removeprefix("Value error, "), error.get("input"), True))
    return issues


__all__ = [
    "ConfigError",
    "ReductionConfig",
    "TokredError",
    "config_to_dict",
    "config_to_yaml",
    "list_presets",
    "load_config",
    "merge_layers",
    "parse_overrides",
    "reduction_config_model",
    "validate_config",
]
