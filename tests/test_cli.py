from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from plugin_helpers import merge_plugin, selectors_plugin

from tokred import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def test_registries(make_registries, monkeypatch):
    registries = make_registries(selectors_plugin("sels", "every_other"), merge_plugin())
    monkeypatch.setattr(cli, "_registries", lambda: registries)
    return registries


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_lists_parts_by_kind_with_source(test_registries, capsys):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "selectors:"
    assert "every_other" in lines[1] and "Picks every other slot." in lines[1] and "[test sels]" in lines[1]
    assert "merge ops:" in lines and "localities:" in lines and "adapters:" in lines
    assert any("blend" in line and "blends tokens" in line for line in lines)


def test_config_show_prints_resolved_yaml(test_registries, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("selector: every_other\nmerge: {name: blend}\n")
    code, out, err = run_cli(capsys, "config", "show", str(path), "ratio=0.3", "selector.start=1")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["ratio"] == 0.3
    assert data["selector"] == {"name": "every_other", "start": 1}
    assert data["merge"] == {"name": "blend", "temperature": 100.0, "unmerge": "transpose"}


def test_config_show_bad_value_exits_2_without_traceback(test_registries, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("selector: every_other\n")
    code, out, err = run_cli(capsys, "config", "show", str(path), "ratio=3", "selector=nope")
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("tokred: error: invalid config:")
    assert "ratio: Input should be less than 1 (given: 3)" in err
    assert "selector.name: unknown selector 'nope'; available: every_other" in err


def test_config_show_unknown_preset_exits_2(test_registries, capsys):
    code, _, err = run_cli(capsys, "config", "show", "no_such_preset")
    assert code == 2
    assert "unknown preset 'no_such_preset'" in err


def test_config_schema_is_json_with_registered_parts(test_registries, capsys):
    code, out, _ = run_cli(capsys, "config", "schema")
    assert code == 0
    schemas = json.loads(out)
    assert set(schemas) == {"reduction", "generate", "bench", "sweep"}
    schema = schemas["reduction"]
    assert "EveryOtherSelector" in schema["$defs"]
    assert schema["properties"]["ratio"]["exclusiveMaximum"] == 1.0
    assert "steps" not in schema["properties"] and "prompt" not in schema["properties"]
    generate = schemas["generate"]
    assert "steps" in generate["properties"] and "reduction" in generate["properties"]
    assert "ratio" not in generate["properties"]  # reduction settings sit under `reduction`
    code, out, _ = run_cli(capsys, "config", "schema", "reduction")
    assert code == 0 and json.loads(out) == schema


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["config"])
    assert info.value.code == 2


def _console_script() -> str:
    script = shutil.which("tokred", path=str(Path(sys.executable).parent))
    assert script, "the tokred console script is not installed next to this python"
    return script


def test_console_script_lists_the_installed_example_plugin():
    env = {k: v for k, v in os.environ.items() if k != "TOKRED_LOAD_PLUGINS"}
    result = subprocess.run([_console_script(), "plugins"], capture_output=True, text=True, env=env, check=True)
    line = next(line for line in result.stdout.splitlines() if "checkerboard" in line)
    assert "[tokred-example-plugin 0.1.0]" in line


def test_console_script_shows_a_config_naming_the_example_plugin():
    config = REPO / "examples" / "configs" / "checkerboard.yaml"
    result = subprocess.run(
        [_console_script(), "config", "show", str(config), "ratio=0.25", "selector.phase=0"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = yaml.safe_load(result.stdout)
    assert data["selector"] == {"name": "checkerboard", "phase": 0}
    assert data["ratio"] == 0.25


def test_console_script_rejects_a_bad_option_of_the_plugin_part():
    config = REPO / "examples" / "configs" / "checkerboard.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "tokred", "config", "show", str(config), "selector.phase=2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "selector.phase: Input should be less than or equal to 1 (given: 2)" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_ops_runs_small_and_writes_its_report(capsys, tmp_path):
    out = tmp_path / "ops"
    code, stdout, err = run_cli(
        capsys,
        "bench-ops",
        "--sizes",
        "32x2",
        "--grid",
        "16x16",
        "--localities",
        "tiles8,global",
        "--repeats",
        "2",
        "--batch",
        "1",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    report = json.loads((out / "bench_ops.json").read_text())
    assert [row["locality"] for row in report["costs"]] == ["tiles8", "global"]
    for row in report["costs"]:
        assert row["attention_ms"] > 0 and row["plan_ms"] > 0 and row["merge_ms"] > 0 and row["built_merge_ms"] > 0
        assert row["overhead_share"] == pytest.approx((row["built_merge_ms"] + row["unmerge_ms"]) / row["attention_ms"])
    selectors = {(row["locality"], row["selector"]) for row in report["quality"]}
    assert selectors == {(loc, sel) for loc in ("tiles8", "global") for sel in ("toma", "random", "grid")}
    assert "overhead at tiles 8x8" not in stdout  # that target is about C=640 only
    assert "toma better than random and grid at tiles8" in stdout
    assert (out / "bench_ops.txt").read_text().startswith("tokred bench-ops:")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--localities", "tiles9"], "--localities: unknown 'tiles9'; available: tiles8, tiles4, stripes8, global"),
        (["--sizes", "640"], "--sizes: expected AxB"),
        (["--grid", "0x4"], "--grid: expected AxB[,AxB...] with positive numbers"),
    ],
)
def test_bench_ops_bad_arguments_exit_2(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, "bench-ops", "--out", str(tmp_path), "--quiet", *argv)
    assert code == 2
    assert fragment in err


def test_bench_ops_unwritable_out_exits_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "bench-ops", "--out", str(blocker / "sub"), "--quiet", "--sizes", "8x1")
    assert code == 2
    assert "--out: cannot write to" in err


def test_config_presets_lists_shipped_presets(capsys):
    code, out, _ = run_cli(capsys, "config", "presets")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines()}
    assert {"toma", "toma_stripe", "random", "grid", "todo", "tomesd_like"} <= names


def test_config_show_prints_the_reduction_only_and_a_job_on_request(capsys):
    code, out, err = run_cli(capsys, "config", "show", "toma")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["ratio"] == 0.5 and data["selector"]["name"] == "toma" and data["locality"]["name"] == "tiles"
    assert not {"prompt", "model", "steps", "seed"} & set(data)
    code, out, err = run_cli(capsys, "config", "show", "--job", "generate", "toma", "steps=2", "ratio=0.3")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["steps"] == 2 and data["reduction"]["ratio"] == 0.3 and "ratio" not in data
    code, _, err = run_cli(capsys, "config", "show", "toma", "steps=2")
    assert code == 2 and "'steps' is a generation setting" in err


def test_commands_are_listed_by_importance_and_share_their_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    names = [cmd.name for cmd in sorted(cli.COMMANDS, key=lambda c: c.rank) if cmd.group is None]
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    listed = [word for word in listed if word in names or word == "config"]
    assert listed[:5] == ["bench", "generate", "eval", "sweep", "config"]
    assert all(cmd.help for cmd in cli.COMMANDS)  # every command has a help line (its docstring)
    parser = cli.build_parser()
    for name in ("bench", "generate", "bench-ops"):
        sub = parser._subparsers._group_actions[0].choices[name]  # argparse keeps subparsers here
        flags = {flag for action in sub._actions for flag in action.option_strings}
        assert {"--out", "--quiet", "--threads", "--device", "--dtype"} <= flags, name
