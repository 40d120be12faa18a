"""The ``tokred`` command line."""

from __future__ import annotations

import argparse
import json
import os
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


def _run_comparison(args: argparse.Namespace, command: str, steps: int, run) -> int:  # type: ignore[no-untyped-def]
    """Shared by bench-sdxl and bench-flux: threads, progress bar, table, and the JSON and text files."""
    import torch
    from tqdm import tqdm

    from tokred.compare import format_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = _prepare_out(args.out)
    bar = tqdm(total=steps, desc=f"{command} {args.target}", disable=args.quiet)
    try:
        rows, setup = run(lambda label: (bar.set_postfix_str(label), bar.update(1)))
    finally:
        bar.close()
    setup.update(threads=torch.get_num_threads(), torch=torch.__version__)
    text = f"tokred {command} {args.target}: {json.dumps(setup)}\n\n{format_rows(rows)}"
    if not setup.get("tomesd", True):
        text += "\n(tomesd is not installed: skipped)"
    print(text)
    stem = f"{command.replace('-', '_')}_{args.target}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"setup": setup, "rows": [r.as_dict() for r in rows]}, indent=2))
    (out_dir / f"{stem}.txt").write_text(text + "\n")
    return 0


def cmd_bench_sdxl(args: argparse.Namespace) -> int:
    from tokred import bench_sdxl

    if args.target == "block":
        repeats = args.repeats or 5
        methods = bench_sdxl.block_methods(args.ratio)
        run = lambda progress: bench_sdxl.bench_block(ratio=args.ratio, repeats=repeats, progress=progress)  # noqa: E731
    else:
        repeats = args.repeats or 1
        methods = bench_sdxl.unet_methods(args.ratio)
        run = lambda progress: bench_sdxl.bench_unet(  # noqa: E731
            ratio=args.ratio, size=args.size, repeats=repeats, progress=progress
        )
    return _run_comparison(args, "bench-sdxl", len(methods) * (repeats + 1), run)


def cmd_bench_flux(args: argparse.Namespace) -> int:
    from tokred import bench_flux

    double, single = (0, 1) if args.target == "block" else (args.double, args.single)
    steps = len(bench_flux.flux_methods(args.ratio)) * (args.repeats + 1)
    return _run_comparison(
        args,
        "bench-flux",
        steps,
        lambda progress: bench_flux.bench_flux(
            double=double,
            single=single,
            size=args.size,
            text_len=args.text_len,
            ratio=args.ratio,
            repeats=args.repeats,
            progress=progress,
        ),
    )


def _split_config(positional: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [KEY=VALUE ...]``: the first item is the config unless it is an override."""
    if positional and "=" not in positional[0]:
        return positional[0], positional[1:]
    return None, positional


def _bar(args: argparse.Namespace, total: int, desc: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=args.quiet, unit="step")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from tokred.bench import load_bench_config, run_bench

    source, overrides = _split_config(args.config)
    config = load_bench_config(source, overrides)
    out_dir = _prepare_out(args.out, run_dir=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    bar = _bar(args, len(config.methods) * (config.repeats + 1), "bench")
    try:
        report = run_bench(config, out_dir, progress=lambda label: (bar.set_postfix_str(label), bar.update(1)))
    finally:
        bar.close()
    print(report["text"])
    print(f"\nwritten to {out_dir}: bench.txt, bench.json, bench.csv, speed_vs_deviation.png, toma_destinations.png")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tokred import sources
    from tokred.config import load_config
    from tokred.generate import run_generate

    config = load_config(args.config, overrides=args.overrides)
    sources.describe(config.model)
    sources.validate_options(config.model, config.model_options)
    name = Path(args.config).stem
    out_dir = _prepare_out(args.out or f"tokred-out/generate/{name}", run_dir=True)
    print(
        f"generating {len(config.prompt) if isinstance(config.prompt, list) else 1} image(s) with {config.model}, "
        f"{config.steps} steps, strategy {name} (ratio {config.ratio})",
        file=sys.stderr,
    )
    record = run_generate(config, out_dir)
    total = (record.get("stats") or {}).get("total", {})
    print(
        f"{out_dir}: {record['seconds']:.2f} s generating, tokens kept "
        f"{total.get('tokens_out', 0)}/{total.get('tokens_in', 0)}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tokred.evaluate import add_clip_scores, evaluate, local_clip_scorer, local_feature_extractor, pairs, write_eval

    run_dir, baseline = Path(args.run_dir), Path(args.baseline)
    pairs(run_dir, baseline)  # inputs first: nothing is created for a run that cannot be evaluated
    features = local_feature_extractor(args.features) if args.features else None
    scorer = local_clip_scorer(args.clip) if args.clip else None
    out_dir = _prepare_out(args.out or f"tokred-out/eval/{run_dir.name}")
    report = evaluate(run_dir, baseline, features)
    if scorer is not None:
        add_clip_scores(report, run_dir, baseline, scorer)
    write_eval(report, out_dir / "eval.json")
    summary = report["summary"]
    line = f"{summary['images']} image pairs: PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}"
    if "fid" in summary:
        line += f", feature similarity {summary['feature_similarity']:.4f}, FD(features) {summary['fid']:.3f}"
    if "clip_score" in summary:
        line += f", CLIP score {summary['clip_score']:.2f} (baseline {summary['clip_score_baseline']:.2f})"
    print(line)
    print(f"written: {out_dir / 'eval.json'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tokred.sweep import expand, load_sweep_config, run_sweep

    source, overrides = _split_config(args.config)
    config = load_sweep_config(source, overrides)
    out_dir = _prepare_out(args.out or f"tokred-out/sweep/{Path(source).stem if source else 'default'}")
    bar = _bar(args, len(expand(config)), "sweep")
    if os.environ.get("RANK", "0") != "0":
        bar.disable = True  # one bar, on rank 0

    def progress(done: int, total: int) -> None:
        bar.total = total  # this rank's unfinished items
        bar.update(1)

    try:
        summary = run_sweep(config, out_dir, progress=progress)
    finally:
        bar.close()
    if summary["rank"] == 0:
        print(f"{summary['items']} items ({summary['world']} process(es)); written: {out_dir / 'results.csv'}")
        for row in summary["table"]:
            quality = f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f}" if "psnr" in row else ""
            print(
                f"  {row['id']}  {row['strategy']:<12} ratio {row['ratio']:<4} seed {row['seed']:<3} "
                f"{row['seconds']:7.2f} s  {quality}"
            )
    return 0


RESULT_MARKERS = ("record.json", "bench.json", "eval.json", "results.jsonl", "bench_ops.json")


def _prepare_out(path: str, run_dir: bool = False) -> Path:
    """Check that results can be written under ``path`` (created if needed) — before any model work.

    A run directory is written to a temporary sibling and moved into place when complete, replacing an earlier
    result there; a directory holding anything else is refused rather than replaced.
    """
    out = Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise TokredError(f"--out: {str(out)!r} is a file, not a directory")
    if run_dir and out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in RESULT_MARKERS):
        raise TokredError(f"--out: {str(out)!r} holds files that are not a tokred result; choose another directory")
    where = out.parent if run_dir else out
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".tokred-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink(missing_ok=True)
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

    bench = commands.add_parser(
        "bench",
        help="the main job: every method side by side on one denoiser (speed, FLOP model, deviation), with plots",
    )
    bench.add_argument(
        "config",
        nargs="*",
        metavar="[CONFIG] [KEY=VALUE]",
        help="a bench YAML (default: the embedded default) and overrides, e.g. repeats=2",
    )
    bench.add_argument("--out", default="tokred-out/bench", help="result directory (default tokred-out/bench)")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=cmd_bench)

    gen = commands.add_parser("generate", help="generate images with a strategy applied; PNGs and a JSON record")
    gen.add_argument("config", metavar="CONFIG", help="a preset name or a YAML file")
    gen.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model=tiny:sdxl steps=2")
    gen.add_argument("--out", default=None, help="result directory (default tokred-out/generate/<CONFIG>)")
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(func=cmd_generate)

    ev = commands.add_parser("eval", help="PSNR/SSIM (and feature metrics) of a run against same-seed baseline images")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--baseline", required=True, metavar="DIR", help="directory of the baseline images")
    ev.add_argument(
        "--features",
        default=None,
        metavar="MODEL_DIR",
        help="a local transformers vision model (DINO, CLIP vision, ViT) for feature similarity and FID",
    )
    ev.add_argument(
        "--clip",
        default=None,
        metavar="MODEL_DIR",
        help="a local transformers CLIP model (with its tokenizer) for CLIP scores against the prompts",
    )
    ev.add_argument("--out", default=None, help="result directory (default tokred-out/eval/<RUN_DIR name>)")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    sw = commands.add_parser("sweep", help="strategies x ratios x seeds x prompts; data-parallel under torchrun")
    sw.add_argument("config", nargs="*", metavar="[CONFIG] [KEY=VALUE]")
    sw.add_argument("--out", default=None, help="result directory (default tokred-out/sweep/<CONFIG>)")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=cmd_sweep)

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
