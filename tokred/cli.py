"""The ``tokred`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from tokred.errors import TokredError

EXIT_USAGE = 2
KIND_TITLES = {
    "selector": "selectors",
    "merge_op": "merge ops",
    "locality": "localities",
    "schedule": "schedules",
    "adapter": "adapters",
}


def _registries():  # type: ignore[no-untyped-def]
    from tokred.plugins import default_registries

    return default_registries()


def cmd_plugins(args: argparse.Namespace) -> int:
    from tokred.registry import KINDS

    registries = _registries()
    for kind in KINDS:
        parts = list(registries[kind])
        print(f"{KIND_TITLES[kind]}:")
        if not parts:
            print("  (none)")
        width = max((len(part.name) for part in parts), default=0)
        for part in parts:
            print(f"  {part.name:<{width}}  {part.description}  [{part.source}]")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from tokred.config import config_to_yaml, load_config

    config = load_config(args.config, overrides=args.overrides, registries=_registries())
    sys.stdout.write(config_to_yaml(config))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from tokred.config import run_config_model

    print(json.dumps(run_config_model(_registries()).model_json_schema(), indent=2))
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    from tokred.config import list_presets

    for name, path in list_presets().items():
        print(f"{name}  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tokred import __version__

    parser = argparse.ArgumentParser(
        prog="tokred", description="Token reduction for diffusion models: fewer tokens, same pictures, sooner."
    )
    parser.add_argument("--version", action="version", version=f"tokred {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plugins = commands.add_parser("plugins", help="list every registered part by kind, with its source")
    plugins.set_defaults(func=cmd_plugins)

    config = commands.add_parser("config", help="show, validate and describe run configs")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = config_commands.add_parser("show", help="print the fully resolved, validated config as YAML")
    show.add_argument("config", metavar="PRESET_OR_FILE", help="a preset name or a YAML file")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides, e.g. ratio=0.3")
    show.set_defaults(func=cmd_config_show)
    schema = config_commands.add_parser("schema", help="print the JSON schema of the run config")
    schema.set_defaults(func=cmd_config_schema)
    presets = config_commands.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=cmd_config_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.func(args))
    except TokredError as exc:
        print(f"tokred: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
