"""The ``tokred`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

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


def _pairs(text: str, what: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise TokredError(f"{what}: expected AxB[,AxB...], got {text!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise TokredError(f"{what}: expected AxB[,AxB...] with positive numbers, got {text!r}")
    return pairs  # type: ignore[return-value]


def cmd_bench_ops(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tokred.bench_ops import LOCALITIES, check_targets, format_report, run_bench_ops

    localities = [name for name in args.localities.split(",") if name]
    unknown = [name for name in localities if name not in LOCALITIES]
    if unknown:
        raise TokredError(f"--localities: unknown {unknown[0]!r}; available: {', '.join(LOCALITIES)}")
    sizes = _pairs(args.sizes, "--sizes")
    grid = _pairs(args.grid, "--grid")[0]
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = _prepare_out(args.out)
    bar = tqdm(total=len(sizes) * len(localities), desc="bench-ops", disable=args.quiet, unit="case")
    try:
        report = run_bench_ops(
            batch=args.batch,
            grid=grid,
            sizes=sizes,
            localities=localities,
            ratio=args.ratio,
            repeats=args.repeats,
            slow_repeats=args.slow_repeats,
            device=args.device,
            dtype=dtypes[args.dtype],
            on_case=lambda label: (bar.set_postfix_str(label), bar.update(1)),
        )
    finally:
        bar.close()
    text = format_report(report) + "\n\n" + "\n".join(check_targets(report))
    print(text)
    (out_dir / "bench_ops.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_ops.txt").write_text(text + "\n")
    print(f"\nwritten: {out_dir / 'bench_ops.json'}, {out_dir / 'bench_ops.txt'}")
    return 0


def cmd_bench_sdxl(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tokred import bench_sdxl
    from tokred.compare import format_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = _prepare_out(args.out)
    if args.target == "block":
        methods, total = bench_sdxl.block_methods(args.ratio), args.repeats or 5
    else:
        methods, total = bench_sdxl.unet_methods(args.ratio), args.repeats or 1
    bar = tqdm(total=len(methods) * (total + 1), desc=f"bench-sdxl {args.target}", disable=args.quiet)

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        if args.target == "block":
            rows, setup = bench_sdxl.bench_block(ratio=args.ratio, repeats=total, progress=progress)
        else:
            rows, setup = bench_sdxl.bench_unet(ratio=args.ratio, size=args.size, repeats=total, progress=progress)
    finally:
        bar.close()
    setup.update(threads=torch.get_num_threads(), torch=torch.__version__)
    text = f"tokred bench-sdxl {args.target}: {json.dumps(setup)}\n\n{format_rows(rows)}"
    if not setup.get("tomesd", True):
        text += "\n(tomesd is not installed: skipped)"
    print(text)
    (out_dir / f"bench_sdxl_{args.target}.json").write_text(
        json.dumps({"setup": setup, "rows": [row.as_dict() for row in rows]}, indent=2)
    )
    (out_dir / f"bench_sdxl_{args.target}.txt").write_text(text + "\n")
    return 0


def cmd_bench_flux(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tokred import bench_flux
    from tokred.compare import format_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = _prepare_out(args.out)
    double, single = (0, 1) if args.target == "block" else (args.double, args.single)
    methods = bench_flux.flux_methods(args.ratio)
    bar = tqdm(total=len(methods) * (args.repeats + 1), desc=f"bench-flux {args.target}", disable=args.quiet)

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        rows, setup = bench_flux.bench_flux(
            double=double,
            single=single,
            size=args.size,
            text_len=args.text_len,
            ratio=args.ratio,
            repeats=args.repeats,
            progress=progress,
        )
    finally:
        bar.close()
    setup.update(threads=torch.get_num_threads(), torch=torch.__version__)
    text = f"tokred bench-flux {args.target}: {json.dumps(setup)}\n\n{format_rows(rows)}"
    print(text)
    (out_dir / f"bench_flux_{args.target}.json").write_text(
        json.dumps({"setup": setup, "rows": [row.as_dict() for row in rows]}, indent=2)
    )
    (out_dir / f"bench_flux_{args.target}.txt").write_text(text + "\n")
    return 0


def _prepare_out(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tokred-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TokredError(f"--out: cannot write to {str(out)!r}: {exc.strerror or exc}") from None
    return out


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

    ops = commands.add_parser(
        "bench-ops",
        help="time plan/merge/unmerge against full-sequence attention; compare selectors on structured input",
    )
    ops.add_argument("--sizes", default="640x10,3072x24", help="CHANNELSxHEADS list (default: 640x10,3072x24)")
    ops.add_argument("--localities", default="tiles8,tiles4,global", help="from tiles8,tiles4,stripes8,global")
    ops.add_argument("--grid", default="64x64", help="token grid HxW (default 64x64)")
    ops.add_argument("--batch", type=int, default=2)
    ops.add_argument("--ratio", type=float, default=0.5)
    ops.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median reported)")
    ops.add_argument("--slow-repeats", type=int, default=1, help="repeats for the global locality (slow: O(d*N^2))")
    ops.add_argument("--device", default="cpu")
    ops.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ops.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ops.add_argument("--out", default="tokred-out/bench-ops", help="directory for bench_ops.json and .txt")
    ops.add_argument("--quiet", action="store_true", help="no progress bar")
    ops.set_defaults(func=cmd_bench_ops)

    sdxl = commands.add_parser(
        "bench-sdxl", help="SDXL at real sizes (random weights): one transformer stage, or the whole UNet vs tomesd"
    )
    sdxl.add_argument("target", choices=["block", "unet"])
    sdxl.add_argument("--ratio", type=float, default=0.5)
    sdxl.add_argument("--size", type=int, default=1024, help="image size for the UNet (latents are size/8)")
    sdxl.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default: block 5, unet 1)")
    sdxl.add_argument("--threads", type=int, default=0)
    sdxl.add_argument("--out", default="tokred-out/bench-sdxl")
    sdxl.add_argument("--quiet", action="store_true")
    sdxl.set_defaults(func=cmd_bench_sdxl)

    flux = commands.add_parser(
        "bench-flux", help="Flux at real width (random weights): one single block, or a reduced-depth transformer"
    )
    flux.add_argument("target", choices=["block", "model"])
    flux.add_argument("--double", type=int, default=2, help="double blocks of the reduced-depth model")
    flux.add_argument("--single", type=int, default=4, help="single blocks of the reduced-depth model")
    flux.add_argument("--size", type=int, default=1024, help="image size (image tokens: (size/16)^2)")
    flux.add_argument("--text-len", type=int, default=512)
    flux.add_argument("--ratio", type=float, default=0.5)
    flux.add_argument("--repeats", type=int, default=3)
    flux.add_argument("--threads", type=int, default=0)
    flux.add_argument("--out", default="tokred-out/bench-flux")
    flux.add_argument("--quiet", action="store_true")
    flux.set_defaults(func=cmd_bench_flux)
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
