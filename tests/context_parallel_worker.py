"""Run under ``torchrun --nproc_per_node 2``: tokred on a tiny Flux transformer with diffusers' Ulysses context
parallelism (gloo, CPU), against the same tokred run in one process. Writes a JSON report from rank 0."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import tokred
from tokred.jobs.testbed import TINY_FLUX_CONFIG, flux_transformer

torch.set_num_threads(1)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # diffusers picks the rank's device as rank % torch.accelerator.device_count(), which is 0 on a CPU
    torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig
    from diffusers.models import attention_dispatch

    model = flux_transformer(TINY_FLUX_CONFIG)
    h, w, text = 8, 6, 4
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, h * w, 16, generator=gen),
        "encoder_hidden_states": torch.randn(1, text, 32, generator=gen),
        "pooled_projections": torch.randn(1, 32, generator=gen),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }
    locality = {"name": "tiles", "size": [2, 3]}  # 2 rows: tiles never cross the 4-row shards
    report: dict = {"world": dist.get_world_size()}
    single: dict = {}
    with torch.no_grad():
        modes = {
            "tokens": {},
            "kv": {"mode": "kv"},
            "kv_unweighted": {"mode": "kv", "proportional": "off"},
            "tokens_mask": {"proportional": "mask"},  # the bias as a mask: diffusers gathers it with the keys
            "kv_mask": {"mode": "kv", "proportional": "mask"},
        }
        single["baseline"] = model(**inputs, return_dict=False)[0]
        for mode, settings in modes.items():
            with tokred.patched(model, "toma", locality=locality, **settings):
                single[mode] = model(**inputs, return_dict=False)[0]
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        sent = {"elements": 0}
        original = attention_dispatch._all_to_all_single

        def counting(x, group):
            sent["elements"] += x.numel()
            return original(x, group)

        attention_dispatch._all_to_all_single = counting
        for mode in ("baseline", *modes):
            sent["elements"] = 0
            if mode == "baseline":
                out = model(**inputs, return_dict=False)[0]
                stats = None
            else:
                with tokred.patched(model, "toma", locality=locality, **modes[mode]) as patch:
                    out = model(**inputs, return_dict=False)[0]
                    stats = patch.stats.total
                    grids = sorted({plan.grid for plan in patch.engine.plans})
            report[mode] = {
                "max_difference": float((out - single[mode]).abs().max()),
                "elements_sent": sent["elements"],
                "merged_calls": None if stats is None else stats.merged_calls,
                "tokens": None if stats is None else [stats.tokens_in, stats.tokens_out],
                "grids": None if stats is None else [list(g) for g in grids],
            }
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
