"""The ``tokred`` command line: one handler per command, its options declared beside it.

A handler is registered with :func:`command` (its docstring's first line is the help line) and takes its own
arguments from :func:`argument` decorators. Flags several commands share (``--out``, ``--quiet``, ``--threads``,
``--device``, ``--dtype``) are declared once, in :data:`SHARED_FLAGS`, and named by the commands that take them.
Commands are listed in ``tokred --help`` by importance (their ``rank``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokred.errors import TokredError

EXIT_USAGE = 2
KIND_TITLES = {
    "selector": "selectors",
    "merge_op": "merge ops",
    "locality": "localities",
    "schedule": "schedules",
    "adapter": "adapters",
}

# --- the command registry ------------------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]

#: flags shared by several commands: name -> (flag, argparse keywords)
SHARED_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "out": ("--out", {"default": None, "metavar": "DIR", "help": "result directory (default: {out})"}),
    "quiet": ("--quiet", {"action": "store_true", "help": "no progress bar"}),
    "threads": ("--threads", {"type": int, "default": 0, "help": "torch CPU threads (default: torch's choice)"}),
    "device": ("--device", {"default": None, "help": "cpu, cuda, cuda:N, or auto: cuda when there is one"}),
    "dtype": (
        "--dtype",
        {
            "default": None,
            "choices": ["auto", "fp32", "fp16", "bf16"],
            "help": "model dtype (auto: bf16 on CUDA, fp32 on the CPU)",
        },
    ),
}


@dataclass
class Command:
    name: str
    handler: Handler
    rank: int
    shared: tuple[str, ...]
    out_default: str | None
    group: str | None
    arguments: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)

    @property
    def help(self) -> str:
        doc = (self.handler.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


COMMANDS: list[Command] = []


def command(
    name: str, *, rank: int, shared: tuple[str, ...] = (), out: str | None = None, group: str | None = None
) -> Callable[[Handler], Handler]:
    """Register a handler as ``tokred <group> <name>``; ``shared`` names the shared flags it takes."""

    def register(handler: Handler) -> Handler:
        arguments = list(reversed(getattr(handler, "_arguments", [])))  # decorators apply bottom-up
        COMMANDS.append(Command(name, handler, rank, shared, out, group, arguments))
        return handler

    return register


def argument(*names: str, **kwargs: Any) -> Callable[[Handler], Handler]:
    """Declare one argparse argument of the handler below."""

    def add(handler: Handler) -> Handler:
        handler._arguments = [*getattr(handler, "_arguments", []), (names, kwargs)]  # type: ignore[attr-defined]
        return handler

    return add


# --- shared plumbing -----------------------------------------------------------------------------------------


def _registries():  # type: ignore[no-untyped-def]
    from tokred.plugins import default_registries

    return default_registries()


def _split_config(positional: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [KEY=VALUE ...]``: the first item is the config unless it is an override."""
    if positional and "=" not in positional[0]:
        return positional[0], positional[1:]
    return None, positional


def _progress(args: argparse.Namespace, total: int, desc: str, unit: str = "step"):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=args.quiet, unit=unit)


def _tick(bar) -> Callable[[str], None]:  # type: ignore[no-untyped-def]
    return lambda label: (bar.set_postfix_str(label), bar.update(1))  # type: ignore[return-value]


def device_flags(args: argparse.Namespace) -> dict[str, str]:
    """The shared ``--device`` / ``--dtype`` flags given, as config values (they win over the config's)."""
    return {key: value for key in ("device", "dtype") if (value := getattr(args, key, None)) is not None}


def device_and_dtype(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The torch device and dtype the shared ``--device`` / ``--dtype`` flags ask for."""
    from tokred.jobs.sources import resolve_device

    return resolve_device(args.device or "auto", args.dtype or "auto")


RESULT_MARKERS = ("record.json", "bench.json", "eval.json", "results.jsonl", "bench_ops.json")


def prepare_out(path: str, run_dir: bool = False) -> Path:
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


# --- the main job and the other jobs -------------------------------------------------------------------------


@command("bench", rank=0, shared=("out", "quiet", "threads", "device", "dtype"), out="tokred-out/bench")
@argument(
    "config",
    nargs="*",
    metavar="[CONFIG] [KEY=VALUE]",
    help="a bench YAML (default: the embedded default) and overrides, e.g. repeats=2 ratio=0.3",
)
def cmd_bench(args: argparse.Namespace) -> int:
    """The main job: every method side by side on one denoiser (speed, FLOP model, deviation), with plots."""
    from tokred.bench.job import load_bench_config, run_bench

    source, overrides = _split_config(args.config)
    config = load_bench_config(source, overrides)
    config = config.model_copy(update=device_flags(args))
    out_dir = prepare_out(args.out, run_dir=True)
    from tokred.jobs.sources import resolve_device

    warmup = config.warmup if config.warmup is not None else 2 * (resolve_device(config.device)[0].type == "cuda")
    bar = _progress(args, len(config.methods) * (config.repeats + warmup + 1), "bench")
    try:
        report = run_bench(config, out_dir, progress=_tick(bar))
    finally:
        bar.close()
    print(report["text"])
    print(f"\nwritten to {out_dir}: bench.txt, bench.json, bench.csv, speed_vs_deviation.png, toma_destinations.png")
    return 0


@command("generate", rank=1, shared=("out", "quiet", "threads", "device", "dtype"))
@argument("config", metavar="CONFIG", help="a preset name (the reduction) or a YAML file (job and reduction keys)")
@argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model=tiny:sdxl steps=2 ratio=0.3")
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate images with a reduction config applied; PNGs and a JSON record."""
    from tokred.jobs import sources
    from tokred.jobs.config import load_generate_config
    from tokred.jobs.generate import run_generate

    config = load_generate_config(args.config, overrides=args.overrides, **device_flags(args))
    sources.describe(config.model)
    sources.validate_options(config.model, config.model_options)
    name = Path(args.config).stem
    out_dir = prepare_out(args.out or f"tokred-out/generate/{name}", run_dir=True)
    sources.resolve_device(config.device, config.dtype)  # a device that is not here is an error before any work
    images = len(config.prompt) if isinstance(config.prompt, list) else 1
    reduction = config.reduction  # type: ignore[attr-defined]
    print(
        f"generating {images} image(s) with {config.model}, {config.steps} steps, {name} (ratio {reduction.ratio})",
        file=sys.stderr,
    )
    record = run_generate(config, out_dir)
    total = (record.get("stats") or {}).get("total", {})
    print(
        f"{out_dir}: {record['seconds']:.2f} s generating, tokens kept "
        f"{total.get('tokens_out', 0)}/{total.get('tokens_in', 0)}"
    )
    return 0


@command("eval", rank=2, shared=("out", "quiet"))
@argument("run_dir", metavar="RUN_DIR")
@argument("--baseline", required=True, metavar="DIR", help="directory of the baseline images")
@argument(
    "--features",
    default=None,
    metavar="MODEL_DIR",
    help="a local transformers vision model (DINO, CLIP vision, ViT) for feature similarity and FID",
)
@argument(
    "--clip",
    default=None,
    metavar="MODEL_DIR",
    help="a local transformers CLIP model (with its tokenizer) for CLIP scores against the prompts",
)
def cmd_eval(args: argparse.Namespace) -> int:
    """PSNR/SSIM (and feature metrics) of a run against same-seed baseline images."""
    from tokred.jobs.evaluate import (
        add_clip_scores,
        evaluate,
        local_clip_scorer,
        local_feature_extractor,
        pairs,
        write_eval,
    )

    run_dir, baseline = Path(args.run_dir), Path(args.baseline)
    pairs(run_dir, baseline)  # inputs first: nothing is created for a run that cannot be evaluated
    features = local_feature_extractor(args.features) if args.features else None
    scorer = local_clip_scorer(args.clip) if args.clip else None
    out_dir = prepare_out(args.out or f"tokred-out/eval/{run_dir.name}")
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


@command("sweep", rank=3, shared=("out", "quiet", "threads"))
@argument("config", nargs="*", metavar="[CONFIG] [KEY=VALUE]")
def cmd_sweep(args: argparse.Namespace) -> int:
    """Methods x ratios x seeds x prompts; data-parallel under torchrun."""
    from tokred.jobs.sweep import expand, load_sweep_config, run_sweep

    source, overrides = _split_config(args.config)
    config = load_sweep_config(source, overrides)
    out_dir = prepare_out(args.out or f"tokred-out/sweep/{Path(source).stem if source else 'default'}")
    bar = _progress(args, len(expand(config)), "sweep")
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
                f"  {row['id']}  {row['method']:<12} ratio {row['ratio']:<4} seed {row['seed']:<3} "
                f"{row['seconds']:7.2f} s  {quality}"
            )
    return 0


# --- configs and plugins -------------------------------------------------------------------------------------

JOB_CHOICES = ("generate", "bench", "sweep")


@command("show", rank=4, group="config")
@argument("config", metavar="PRESET_OR_FILE", help="a preset name or a YAML file")
@argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides, e.g. ratio=0.3")
@argument("--job", choices=JOB_CHOICES, default=None, help="resolve a job config (reduction nested) instead")
def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the fully resolved, validated reduction config (or job config) as YAML."""
    from tokred.config import config_to_yaml, load_config

    if args.job == "generate":
        from tokred.jobs.config import load_generate_config

        config = load_generate_config(args.config, overrides=args.overrides, registries=_registries())
    elif args.job == "bench":
        from tokred.bench.job import load_bench_config

        config = load_bench_config(args.config, args.overrides)
    elif args.job == "sweep":
        from tokred.jobs.sweep import load_sweep_config

        config = load_sweep_config(args.config, args.overrides)
    else:
        config = load_config(args.config, overrides=args.overrides, registries=_registries())
    sys.stdout.write(config_to_yaml(config))
    return 0


@command("schema", rank=5, group="config")
@argument("which", nargs="?", choices=("reduction", *JOB_CHOICES), default=None, help="one schema (default: all)")
def cmd_config_schema(args: argparse.Namespace) -> int:
    """Print the JSON schemas of the reduction config and of the job configs that hold one."""
    from tokred.bench.job import BenchConfig
    from tokred.config import reduction_config_model
    from tokred.jobs.config import generate_config_model
    from tokred.jobs.sweep import SweepConfig

    registries = _registries()
    schemas = {
        "reduction": lambda: reduction_config_model(registries).model_json_schema(),
        "generate": lambda: generate_config_model(registries).model_json_schema(),
        "bench": BenchConfig.model_json_schema,
        "sweep": SweepConfig.model_json_schema,
    }
    if args.which:
        print(json.dumps(schemas[args.which](), indent=2))
    else:
        print(json.dumps({name: build() for name, build in schemas.items()}, indent=2))
    return 0


@command("presets", rank=6, group="config")
def cmd_config_presets(args: argparse.Namespace) -> int:
    """List the shipped presets."""
    from tokred.config import list_presets

    for name, path in list_presets().items():
        print(f"{name}  {path}")
    return 0


@command("plugins", rank=7)
def cmd_plugins(args: argparse.Namespace) -> int:
    """List every registered part by kind, with its source."""
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


# --- focused measurements ------------------------------------------------------------------------------------


def _pairs(text: str, what: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise TokredError(f"{what}: expected AxB[,AxB...], got {text!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise TokredError(f"{what}: expected AxB[,AxB...] with positive numbers, got {text!r}")
    return pairs  # type: ignore[return-value]


@command("bench-ops", rank=8, shared=("out", "quiet", "threads", "device", "dtype"), out="tokred-out/bench-ops")
@argument("--sizes", default="640x10,3072x24", help="CHANNELSxHEADS list (default: 640x10,3072x24)")
@argument("--localities", default="tiles8,tiles4,global", help="from tiles8,tiles4,stripes8,global")
@argument("--grid", default="64x64", help="token grid HxW (default 64x64)")
@argument("--batch", type=int, default=2)
@argument("--ratio", type=float, default=0.5)
@argument("--repeats", type=int, default=7, help="interleaved repeats (median reported)")
@argument("--slow-repeats", type=int, default=1, help="repeats for the global locality (slow: O(d*N^2))")
def cmd_bench_ops(args: argparse.Namespace) -> int:
    """Time plan/merge/unmerge against full-sequence attention; compare selectors on structured input."""
    from tokred.bench.ops import LOCALITIES, check_targets, format_report, run_bench_ops

    localities = [name for name in args.localities.split(",") if name]
    unknown = [name for name in localities if name not in LOCALITIES]
    if unknown:
        raise TokredError(f"--localities: unknown {unknown[0]!r}; available: {', '.join(LOCALITIES)}")
    sizes = _pairs(args.sizes, "--sizes")
    grid = _pairs(args.grid, "--grid")[0]
    out_dir = prepare_out(args.out)
    device, dtype = device_and_dtype(args)
    bar = _progress(args, len(sizes) * len(localities), "bench-ops", unit="case")
    try:
        report = run_bench_ops(
            batch=args.batch,
            grid=grid,
            sizes=sizes,
            localities=localities,
            ratio=args.ratio,
            repeats=args.repeats,
            slow_repeats=args.slow_repeats,
            device=str(device),
            dtype=dtype,
            on_case=_tick(bar),
        )
    finally:
        bar.close()
    text = format_report(report) + "\n\n" + "\n".join(check_targets(report))
    print(text)
    (out_dir / "bench_ops.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_ops.txt").write_text(text + "\n")
    print(f"\nwritten: {out_dir / 'bench_ops.json'}, {out_dir / 'bench_ops.txt'}")
    return 0


def _run_comparison(args: argparse.Namespace, command_name: str, steps: int, run) -> int:  # type: ignore[no-untyped-def]
    """Shared by bench-sdxl and bench-flux: progress bar, table, and the JSON and text files."""
    import torch

    from tokred.bench.compare import format_rows

    out_dir = prepare_out(args.out)
    bar = _progress(args, steps, f"{command_name} {args.target}")
    try:
        rows, setup = run(_tick(bar))
    finally:
        bar.close()
    setup.update(threads=torch.get_num_threads(), torch=torch.__version__)
    text = f"tokred {command_name} {args.target}: {json.dumps(setup)}\n\n{format_rows(rows)}"
    if not setup.get("tomesd", True):
        text += "\n(tomesd is not installed: skipped)"
    print(text)
    stem = f"{command_name.replace('-', '_')}_{args.target}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"setup": setup, "rows": [r.as_dict() for r in rows]}, indent=2))
    (out_dir / f"{stem}.txt").write_text(text + "\n")
    return 0


@command("bench-sdxl", rank=9, shared=("out", "quiet", "threads"), out="tokred-out/bench-sdxl")
@argument("target", choices=["block", "unet"])
@argument("--ratio", type=float, default=0.5)
@argument("--size", type=int, default=1024, help="image size for the UNet (latents are size/8)")
@argument("--repeats", type=int, default=0, help="interleaved repeats (default: block 5, unet 1)")
def cmd_bench_sdxl(args: argparse.Namespace) -> int:
    """SDXL at real sizes (random weights): one transformer stage, or the whole UNet vs tomesd."""
    from tokred.bench import sdxl

    if args.target == "block":
        repeats = args.repeats or 5
        methods = sdxl.block_methods(args.ratio)
        run = lambda progress: sdxl.bench_block(ratio=args.ratio, repeats=repeats, progress=progress)  # noqa: E731
    else:
        repeats = args.repeats or 1
        methods = sdxl.unet_methods(args.ratio)
        run = lambda progress: sdxl.bench_unet(  # noqa: E731
            ratio=args.ratio, size=args.size, repeats=repeats, progress=progress
        )
    return _run_comparison(args, "bench-sdxl", len(methods) * (repeats + 1), run)


@command("bench-flux", rank=10, shared=("out", "quiet", "threads"), out="tokred-out/bench-flux")
@argument("target", choices=["block", "model"])
@argument("--double", type=int, default=2, help="double blocks of the reduced-depth model")
@argument("--single", type=int, default=4, help="single blocks of the reduced-depth model")
@argument("--size", type=int, default=1024, help="image size (image tokens: (size/16)^2)")
@argument("--text-len", type=int, default=512)
@argument("--ratio", type=float, default=0.5)
@argument("--repeats", type=int, default=3)
def cmd_bench_flux(args: argparse.Namespace) -> int:
    """Flux at real width (random weights): one single block, or a reduced-depth transformer."""
    from tokred.bench import flux

    double, single = (0, 1) if args.target == "block" else (args.double, args.single)
    steps = len(flux.flux_methods(args.ratio)) * (args.repeats + 1)
    return _run_comparison(
        args,
        "bench-flux",
        steps,
        lambda progress: flux.bench_flux(
            double=double,
            single=single,
            size=args.size,
            text_len=args.text_len,
            ratio=args.ratio,
            repeats=args.repeats,
            progress=progress,
        ),
    )


# --- the parser ----------------------------------------------------------------------------------------------


def _add_command(subparsers: Any, cmd: Command) -> None:
    parser = subparsers.add_parser(cmd.name, help=cmd.help, description=(cmd.handler.__doc__ or "").strip())
    for names, kwargs in cmd.arguments:
        parser.add_argument(*names, **kwargs)
    for name in cmd.shared:
        flag, kwargs = SHARED_FLAGS[name]
        kwargs = dict(kwargs)
        if name == "out":
            kwargs["default"] = cmd.out_default
            kwargs["help"] = kwargs["help"].format(out=cmd.out_default or f"tokred-out/{cmd.name}/<CONFIG>")
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(func=cmd.handler, quiet=False, threads=0)


def build_parser() -> argparse.ArgumentParser:
    from tokred import __version__

    parser = argparse.ArgumentParser(
        prog="tokred", description="Token reduction for diffusion models: fewer tokens, same pictures, sooner."
    )
    parser.add_argument("--version", action="version", version=f"tokred {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for cmd in sorted(COMMANDS, key=lambda c: c.rank):
        if cmd.group is None:
            _add_command(commands, cmd)
            continue
        if cmd.group not in groups:
            group = commands.add_parser(cmd.group, help=f"{cmd.group} commands: show, schema, presets")
            groups[cmd.group] = group.add_subparsers(dest=f"{cmd.group}_command", metavar="SUBCOMMAND", required=True)
        _add_command(groups[cmd.group], cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.func(args))
    except TokredError as exc:
        print(f"tokred: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
