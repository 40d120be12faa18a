from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from plugin_helpers import merge_plugin, selectors_plugin

from tokred.config import config_to_dict, config_to_yaml, list_presets, load_config, reduction_config_model
from tokred.errors import ConfigError, UnknownPartError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def registries(make_registries):
    return make_registries(selectors_plugin("sels", "every_other", "alternate"), merge_plugin())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def issue_text(info: pytest.ExceptionInfo) -> str:
    return str(info.value)


def test_defaults_come_from_the_models(registries):
    config = load_config(registries=registries)
    assert config.ratio == 0.5
    assert config.mode == "tokens"
    assert config.sites == ("attn1",)
    assert config.selector is None  # nothing called "toma" is registered here


def test_part_section_is_validated_against_its_options(registries):
    config = load_config({"selector": {"name": "every_other", "start": 1}}, registries=registries)
    assert config.selector.name == "every_other"
    assert config.selector.start == 1
    built = registries.build("selector", config.selector)
    assert built.start == 1


def test_bare_part_name_is_short_for_a_section(registries):
    config = load_config({"selector": "alternate"}, registries=registries)
    assert config.selector.name == "alternate" and config.selector.start == 0


def test_layering_later_files_win(registries, tmp_path):
    base = write(tmp_path / "base.yaml", "ratio: 0.25\nmode: kv\nselector: {name: every_other, start: 1}\n")
    top = write(tmp_path / "top.yaml", "ratio: 0.75\nmerge: {name: blend, temperature: 5}\n")
    config = load_config(base, top, registries=registries)
    assert (config.ratio, config.mode) == (0.75, "kv")
    assert config.selector.start == 1  # kept from base
    assert config.merge.temperature == 5


def test_layering_same_part_merges_options_other_part_replaces(registries, tmp_path):
    base = write(tmp_path / "base.yaml", "merge: {name: blend, temperature: 5, unmerge: pinv}\n")
    same = write(tmp_path / "same.yaml", "merge: {temperature: 7}\n")
    config = load_config(base, same, registries=registries)
    assert (config.merge.temperature, config.merge.unmerge) == (7, "pinv")
    sel = write(tmp_path / "sel.yaml", "selector: {name: every_other, start: 1}\n")
    other = write(tmp_path / "other.yaml", "selector: {name: alternate}\n")
    config = load_config(sel, other, registries=registries)
    assert config.selector.name == "alternate" and config.selector.start == 0


def test_dotlist_overrides(registries, tmp_path):
    base = write(tmp_path / "base.yaml", "selector: {name: every_other}\nmerge: {name: blend}\n")
    config = load_config(
        base,
        overrides=["ratio=0.3", "selector.start=1", "merge.temperature=2.5", "sites=[attn1,ff]"],
        registries=registries,
    )
    assert config.ratio == 0.3 and config.selector.start == 1 and config.merge.temperature == 2.5
    assert config.sites == ("attn1", "ff")


def test_override_switching_part_replaces_the_section(registries, tmp_path):
    base = write(tmp_path / "base.yaml", "selector: {name: every_other, start: 1}\n")
    for override in (["selector=alternate"], ["selector.name=alternate"]):
        config = load_config(base, overrides=override, registries=registries)
        assert config.selector.name == "alternate" and config.selector.start == 0


def test_keyword_values_apply_last(registries):
    config = load_config({"ratio": 0.2}, overrides=["ratio=0.4"], registries=registries, ratio=0.6)
    assert config.ratio == 0.6


def test_interpolation_is_resolved(registries, tmp_path):
    path = write(tmp_path / "interp.yaml", "ratio: 0.5\nmerge: {name: blend, temperature: '${ratio}'}\n")
    assert load_config(path, registries=registries).merge.temperature == 0.5


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("ratio=1.5", ["ratio:", "less than 1", "given: 1.5"]),
        ("ratio=-0.1", ["ratio:", "greater than or equal to 0"]),
        ("mode=fast", ["mode:", "'tokens' or 'kv'", "given: 'fast'"]),
        ("sites=[attn3]", ["sites.0:", "'attn1', 'attn2' or 'ff'", "given: 'attn3'"]),
        ("bogus=1", ["bogus:", "unknown key 'bogus'", "allowed: ratio, mode, sites, proportional, selector,"]),
        ("ratoi=0.3", ["ratoi:", "unknown key 'ratoi' (did you mean 'ratio'?)"]),
        ("steps=50", ["steps:", "'steps' is a generation setting", "not a reduction setting"]),
        ("selector.bogus=1", ["selector.bogus:", "unknown key 'bogus'", "allowed: name, start"]),
        ("selector.start=7", ["selector.start:", "less than or equal to 1", "given: 7"]),
        ("merge.temperature=-1", ["merge.temperature:", "greater than 0"]),
        (
            "selector=every_othr",
            [
                "selector.name:",
                "unknown selector 'every_othr'",
                "did you mean 'every_other'",
                "available: alternate, every_other",
            ],
        ),
        ("selector=5", ["selector: must be a selector name or a mapping with 'name'", "given: 5"]),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(registries, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config({"selector": "every_other", "merge": "blend"}, overrides=[override], registries=registries)
    message = issue_text(info)
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_part_section_without_name(registries):
    with pytest.raises(ConfigError) as info:
        load_config({"selector": {"start": 1}}, registries=registries)
    assert "selector: must be a selector name or a mapping with 'name'; available: alternate, every_other" in str(
        info.value
    )


def test_all_issues_are_reported_at_once(registries):
    with pytest.raises(ConfigError) as info:
        load_config({"ratio": 2, "mode": "x", "selector": "nope"}, registries=registries)
    assert [issue.path for issue in info.value.issues] == ["ratio", "mode", "selector.name"]


def test_kind_with_nothing_registered(registries):
    with pytest.raises(ConfigError, match="locality: no locality is registered"):
        load_config({"locality": {"name": "tiles"}}, registries=registries)


def test_bad_override_syntax(registries):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(overrides=["ratio"], registries=registries)


def test_missing_file_and_non_mapping_file(registries, tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "absent.yaml", registries=registries)
    listed = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(listed, registries=registries)


def test_presets_are_found_by_name(registries, tmp_path):
    write(tmp_path / "fast.yaml", "ratio: 0.7\nselector: every_other\n")
    write(tmp_path / "gentle.yaml", "ratio: 0.2\n")
    assert set(list_presets([tmp_path])) == {"fast", "gentle"}
    config = load_config("fast", overrides=["ratio=0.6"], registries=registries, preset_dirs=[tmp_path])
    assert (config.ratio, config.selector.name) == (0.6, "every_other")
    with pytest.raises(UnknownPartError) as info:
        load_config("fats", registries=registries, preset_dirs=[tmp_path])
    assert str(info.value) == "unknown preset 'fats' (did you mean 'fast'?); available: fast, gentle"


def test_config_object_is_a_valid_source(registries):
    first = load_config({"selector": {"name": "every_other", "start": 1}, "ratio": 0.1}, registries=registries)
    second = load_config(first, overrides=["ratio=0.2"], registries=registries)
    assert second.selector.start == 1 and second.ratio == 0.2


def test_yaml_round_trip_puts_name_first(registries):
    config = load_config({"selector": {"name": "every_other", "start": 1}}, registries=registries)
    text = config_to_yaml(config)
    data = yaml.safe_load(text)
    assert list(data["selector"]) == ["name", "start"]
    assert load_config(data, registries=registries) == config
    assert config_to_dict(config)["selector"] == {"name": "every_other", "start": 1}


def test_schema_lists_every_registered_part(registries):
    schema = reduction_config_model(registries).model_json_schema()
    names = {ref["$ref"].rsplit("/", 1)[-1] for ref in schema["properties"]["selector"]["anyOf"][0]["oneOf"]}
    assert names == {"EveryOtherSelector", "AlternateSelector"}
    assert schema["additionalProperties"] is False


def test_configs_are_immutable(registries):
    config = load_config(registries=registries)
    with pytest.raises(Exception, match="frozen"):
        config.ratio = 0.1  # type: ignore[misc]


def test_shipped_example_configs_validate():
    """Every YAML under examples/ validates against the installed plugins (the example plugin included)."""
    from tokred.plugins import default_registries

    paths = sorted((REPO / "examples").rglob("*.yaml"))
    assert paths, "examples/ should hold example configs"
    for path in paths:
        load_config(path, registries=default_registries())


# --- job configs hold a reduction config ---------------------------------------------------------------------


def test_job_configs_take_flat_or_nested_reduction_keys_and_presets(tmp_path):
    from tokred.jobs.config import load_generate_config

    flat = write(
        tmp_path / "flat.yaml", "model: tiny:flux\nsteps: 2\nratio: 0.3\nlocality: {name: tiles, size: [4, 4]}\n"
    )
    nested = write(
        tmp_path / "nested.yaml",
        "model: tiny:flux\nsteps: 2\nreduction: {ratio: 0.3, locality: {name: tiles, size: [4, 4]}}\n",
    )
    a, b = load_generate_config(flat), load_generate_config(nested)
    assert a == b and a.reduction.ratio == 0.3 and a.reduction.locality.size == (4, 4)
    preset = write(tmp_path / "preset.yaml", "model: tiny:flux\nreduction: toma_flux\n")
    config = load_generate_config(preset, overrides=["ratio=0.25", "steps=3"])
    assert config.reduction.locality.size == (4, 4) and config.reduction.ratio == 0.25 and config.steps == 3
    from_preset = load_generate_config("toma", overrides=["model=tiny:sdxl", "steps=2", "ratio=0.3"])
    assert (from_preset.model, from_preset.steps, from_preset.reduction.ratio) == ("tiny:sdxl", 2, 0.3)
    assert "steps" not in config_to_dict(from_preset.reduction)


def test_job_config_errors_suggest_across_job_and_reduction_keys():
    from tokred.jobs.config import load_generate_config

    with pytest.raises(ConfigError) as info:
        load_generate_config("toma", overrides=["stpes=2", "ratoi=0.3", "ratio=2"])
    message = str(info.value)
    assert "stpes: unknown key 'stpes' (did you mean 'steps'?)" in message
    assert "ratoi: unknown key 'ratoi' (did you mean 'ratio'?)" in message
    assert "ratio: Input should be less than 1 (given: 2)" in message
