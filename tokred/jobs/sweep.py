"""``tokred sweep``: a grid of methods × ratios × seeds × prompts, in one process or data-parallel.

Each item has a stable id (a hash of what it runs), so a sweep can be resumed: items already in a rank's JSONL
are skipped. Under ``torchrun --nproc_per_node N -m tokred sweep CONFIG`` every rank loads the model once,
runs its share of the items (``items[rank::world]``), appends to its own ``results.rank<R>.jsonl``, and rank 0
merges all ranks into ``results.jsonl`` and ``results.csv``. Multi-node runs use torchrun's rendezvous
(``--nnodes``, ``--rdzv-endpoint``) the same way; the output directory must then be shared by the nodes.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tokred.config import config_to_dict
from tokred.errors import ConfigError, ConfigIssue, TokredError, UnknownPartError
from tokred.jobs.config import GenerateSettings, load_generate_config


class SweepGrid(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: list[str] = Field(["baseline", "toma"], min_length=1, description="presets, or baseline")
    ratios: list[float] = Field([0.5], min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    prompts: list[str] = Field(["a photo of a squirrel in the snow"], min_length=1)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: dict[str, Any] = Field(
        default_factory=dict, description="generate settings and reduction settings shared by every item"
    )
    grid: SweepGrid = Field(default_factory=SweepGrid)


def load_sweep_config(source: str | None, overrides: list[str]) -> SweepConfig:
    from tokred.config import merge_layers, validate_plain

    data = merge_layers([source] if source else [], overrides)
    config = validate_plain(SweepConfig, data)
    probe = {"seed": config.grid.seeds[0], "prompt": config.grid.prompts[0]}
    item_config(config, {**probe, "method": "baseline", "ratio": 0.0}, "run")
    for index, name in enumerate(config.grid.methods):
        if name != "baseline":
            item_config(config, {**probe, "method": name, "ratio": config.grid.ratios[0]}, f"grid.methods.{index}")
            for r_index, ratio in enumerate(config.grid.ratios):
                item_config(config, {**probe, "method": name, "ratio": ratio}, f"grid.ratios.{r_index}")
    return config


def expand(config: SweepConfig) -> list[dict[str, Any]]:
    """Every item of the grid, with a stable id; baseline items ignore the ratio (one per seed and prompt)."""
    items: dict[str, dict[str, Any]] = {}
    grid = config.grid
    for method, ratio, seed, prompt in itertools.product(grid.methods, grid.ratios, grid.seeds, grid.prompts):
        item = {"method": method, "ratio": 0.0 if method == "baseline" else ratio, "seed": seed, "prompt": prompt}
        # the id hashes what the item runs (the resolved config), not names: an edited preset is a new item
        key = json.dumps(config_to_dict(item_config(config, item)), sort_keys=True)
        item["id"] = hashlib.sha1(key.encode()).hexdigest()[:12]
        items.setdefault(item["id"], item)
    return list(items.values())


def item_config(config: SweepConfig, item: dict[str, Any], where: str = "") -> GenerateSettings:
    """The generate config of one item: its method's preset, the shared ``run`` settings, then the item's own."""
    sources = [] if item["method"] == "baseline" else [item["method"]]
    try:
        return load_generate_config(*sources, config.run, ratio=item["ratio"], seed=item["seed"], prompt=item["prompt"])
    except ConfigError as exc:
        if where:
            raise ConfigError([ConfigIssue(where, str(issue)) for issue in exc.issues]) from None
        raise
    except UnknownPartError as exc:
        if where:
            raise ConfigError([ConfigIssue(where, str(exc))]) from None
        raise


def _append_line(path: Path, line: str) -> None:
    """Append one JSON line; a line cut short by an interrupted run is ended first, so it cannot swallow this one."""
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as handle:
        handle.write(("\n" if torn else "") + line + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run: its item runs again
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Distributed:
    """Rank, world size and barrier: accelerate's PartialState under torchrun (cpu=True without a GPU)."""

    def __init__(self) -> None:
        self.state = None
        self.rank, self.world = 0, 1
        self.device = "cuda" if _cuda() else "cpu"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # a generous timeout: ranks that finish early wait at the barrier for the slowest one
            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=2))
            self.rank, self.world = self.state.process_index, self.state.num_processes
            self.device = self.state.device
            expected = int(os.environ["WORLD_SIZE"])
            if self.world != expected:
                raise RuntimeError(f"accelerate sees {self.world} processes but WORLD_SIZE is {expected}")

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def run_sweep(
    config: SweepConfig, out_dir: Path, *, progress: Callable[[int, int], object] | None = None
) -> dict[str, Any]:
    from tokred.jobs import sources
    from tokred.jobs.generate import generate_with, write_run

    dist = Distributed()
    items = expand(config)
    mine = items[dist.rank :: dist.world]
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"results.rank{dist.rank}.jsonl"
    done = {row["id"] for path in out_dir.glob("results.rank*.jsonl") for row in _read_jsonl(path)}
    todo = [item for item in mine if item["id"] not in done]
    if todo:
        first = item_config(config, todo[0])
        _, dtype = sources.resolve_device("cpu" if str(dist.device) == "cpu" else "auto", first.dtype)
        pipe = sources.load_pipeline(first.model, first.model_options, seed=0, dtype=dtype).to(dist.device)
        for index, item in enumerate(todo):
            run_config = item_config(config, item)
            images, record = generate_with(pipe, run_config)
            write_run(out_dir / "items" / item["id"], run_config, images, record)
            kept = (
                record["stats"]["total"]["tokens_out"] / max(1, record["stats"]["total"]["tokens_in"])
                if record["stats"]
                else 1.0
            )
            row = {**item, "seconds": record["seconds"], "tokens_kept": kept, "rank": dist.rank}
            _append_line(jsonl, json.dumps(row))
            if progress is not None:
                progress(index + 1, len(todo))
    dist.barrier()
    summary = {
        "items": len(items),
        "ran_here": len(todo),
        "skipped_here": len(mine) - len(todo),
        "rank": dist.rank,
        "world": dist.world,
    }
    if dist.rank == 0:
        summary["table"] = merge_results(out_dir, items)
    dist.barrier()
    return summary


def _first_picture(item: Path) -> Path:
    """The first image of an item, or the frame strip of its first video."""
    still = item / "000.png"
    return still if still.is_file() else item / "000_frames.png"


def merge_results(out_dir: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank 0: one row per item (in grid order) from every rank's JSONL, with PSNR/SSIM against the baseline
    item of the same seed and prompt when the grid has one."""
    from tokred.jobs.evaluate import finite, load_image, psnr, ssim

    rows = {row["id"]: row for path in sorted(out_dir.glob("results.rank*.jsonl")) for row in _read_jsonl(path)}
    missing = [item["id"] for item in items if item["id"] not in rows]
    if missing:
        raise TokredError(f"{len(missing)} items have no result yet ({', '.join(missing[:5])}): run the sweep again")
    baselines = {(r["seed"], r["prompt"]): r["id"] for r in rows.values() if r["method"] == "baseline"}
    table = []
    for item in items:
        row = dict(rows[item["id"]])
        base_id = baselines.get((row["seed"], row["prompt"]))
        if base_id is not None:
            a = load_image(_first_picture(out_dir / "items" / row["id"]))
            b = load_image(_first_picture(out_dir / "items" / base_id))
            row["psnr"], row["ssim"] = psnr(a, b), ssim(a, b)
        table.append(row)
    partial = out_dir / "results.jsonl.partial"
    partial.write_text("".join(json.dumps(finite(row)) + "\n" for row in table))
    partial.replace(out_dir / "results.jsonl")
    fields = ["id", "method", "ratio", "seed", "prompt", "seconds", "tokens_kept", "psnr", "ssim", "rank"]
    with (out_dir / "results.csv.partial").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    (out_dir / "results.csv.partial").replace(out_dir / "results.csv")
    return table
