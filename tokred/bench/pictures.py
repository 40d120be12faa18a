"""Pictures of a bench run: speed against deviation, and the destinations toma kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokred.bench.compare import Row


def destinations_picture(
    model: torch.nn.Module, call: Callable[[], Any], latent: torch.Tensor, path: Path, ratio: float | None
) -> dict[str, Any]:
    """Which tokens ``toma`` kept as destinations on the largest grid, drawn over the latent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import tokred

    with torch.no_grad(), tokred.patched(model, "toma", **({"ratio": ratio} if ratio is not None else {})) as patch:
        call()
        plan = max(patch.engine.plans, key=lambda plan: plan.num_tokens)
    h, w = plan.grid[-2:]  # a video's first frame
    destinations = plan.destinations[0].cpu()
    kept = torch.zeros(h * w)
    kept[destinations[destinations < h * w]] = 1
    image = latent[:3].float().cpu()
    image = torch.nn.functional.interpolate(image[None], size=(h, w), mode="area")[0]
    image = (image - image.amin()) / (image.amax() - image.amin()).clamp_min(1e-8)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3), dpi=100)
    axes[0].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0].set_title(f"input latent (first 3 channels) on the {h}x{w} token grid", fontsize=10)
    mask = kept.view(h, w).bool()
    shown = image * 0.2  # merged-away tokens dimmed, destinations in full colour
    shown[:, mask] = 0.35 + 0.65 * image[:, mask]
    axes[1].imshow(shown.permute(1, 2, 0).numpy(), interpolation="nearest")
    shown_of = f"{int(kept.sum())} of {h * w} tokens" + (" (first frame)" if len(plan.grid) == 3 else "")
    axes[1].set_title(f"toma destinations (bright): {shown_of}", fontsize=10)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"grid": [h, w], "destinations": plan.num_destinations, "tokens": plan.num_tokens}


def speed_plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 5), dpi=100)
    for row in rows:
        axis.scatter(row.deviation, row.speedup, s=60)
        axis.annotate(row.name, (row.deviation, row.speedup), textcoords="offset points", xytext=(6, 4))
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xlabel("relative L2 deviation from the baseline output (lower is better)")
    axis.set_ylabel("speedup vs baseline, same run (higher is better)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
