"""``tokred eval``: paired image metrics of a run against same-seed baseline images.

PSNR and SSIM need no download. Feature metrics (DINO-style cosine similarity and FID) run when a feature
extractor is given: a callable mapping (N, 3, H, W) images in [0, 1] to (N, D) features — a local
``transformers`` vision model directory on the command line, or any callable from Python.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.errors import TokredError

FeatureExtractor = Callable[[Tensor], Tensor]


def load_image(path: Path) -> Tensor:
    """(3, H, W) float in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float(F.mse_loss(a, b))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over channels with a Gaussian window (Wang et al. 2004 constants)."""
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    kernel = (g.transpose(-1, -2) @ g).unsqueeze(0).expand(a.shape[0], 1, window, window)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x.unsqueeze(0), kernel, groups=a.shape[0])[0]

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """FID between two feature sets (N, D); the covariance square root by eigendecomposition."""
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x = torch.cov(x.T) if x.shape[0] > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    cov_y = torch.cov(y.T) if y.shape[0] > 1 else torch.zeros(y.shape[1], y.shape[1], dtype=y.dtype)
    vals, vecs = torch.linalg.eigh(cov_x)
    root_x = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_x @ cov_y @ root_x).clamp_min(0).sqrt().sum()
    return float((mu_x - mu_y).pow(2).sum() + cov_x.trace() + cov_y.trace() - 2 * middle)


def pairs(run_dir: Path, baseline_dir: Path) -> list[tuple[str, Path, Path]]:
    for label, path in (("run directory", run_dir), ("--baseline", baseline_dir)):
        if not path.is_dir():
            raise TokredError(f"{label} {str(path)!r} is not a directory")
    run = {p.name: p for p in sorted(run_dir.glob("*.png"))}
    base = {p.name: p for p in sorted(baseline_dir.glob("*.png"))}
    common = sorted(set(run) & set(base))
    if not common:
        raise TokredError(
            f"no images to compare: {len(run)} PNGs in {str(run_dir)!r}, {len(base)} in {str(baseline_dir)!r}, "
            "none with the same name"
        )
    return [(name, run[name], base[name]) for name in common]


def evaluate(run_dir: Path, baseline_dir: Path, features: FeatureExtractor | None = None) -> dict[str, Any]:
    rows = []
    run_images, base_images = [], []
    for name, run_path, base_path in pairs(run_dir, baseline_dir):
        a, b = load_image(run_path), load_image(base_path)
        if a.shape != b.shape:
            raise TokredError(f"{name}: sizes differ ({tuple(a.shape[1:])} vs {tuple(b.shape[1:])})")
        rows.append({"image": name, "psnr": psnr(a, b), "ssim": ssim(a, b)})
        run_images.append(a)
        base_images.append(b)
    summary: dict[str, Any] = {
        "images": len(rows),
        "psnr": sum(r["psnr"] for r in rows) / len(rows),
        "ssim": sum(r["ssim"] for r in rows) / len(rows),
    }
    if features is not None:
        with torch.no_grad():
            fa, fb = features(torch.stack(run_images)).float(), features(torch.stack(base_images)).float()
        cosine = F.cosine_similarity(fa, fb, dim=-1)
        for row, value in zip(rows, cosine.tolist(), strict=True):
            row["feature_similarity"] = value
        summary["feature_similarity"] = float(cosine.mean())
        summary["fid"] = frechet_distance(fa, fb)
    return {"summary": summary, "images": rows}


def local_feature_extractor(model_dir: str) -> FeatureExtractor:
    """A ``transformers`` vision model saved in a local directory (DINO, CLIP vision, ViT): its pooled output."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise TokredError("--features needs the transformers package") from exc
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise TokredError(f"--features: {model_dir!r} is not a saved transformers model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    except Exception as exc:
        raise TokredError(f"--features: cannot load {model_dir!r}: {type(exc).__name__}: {exc}") from None
    if getattr(config, "model_type", "") == "clip":  # a whole CLIP model: take its vision tower
        model = model.vision_model
        config = config.vision_config
    size = getattr(config, "image_size", 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def extract(images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        out = model(pixel_values=(x - mean) / std)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return extract


TextImageScorer = Callable[[Tensor, list[str]], Tensor]


def _embedding(output: Any) -> Tensor:
    """transformers 5 returns an output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


def local_clip_scorer(model_dir: str) -> TextImageScorer:
    """CLIP score from a local ``transformers`` CLIP model directory (model and tokenizer saved together):
    100 · max(cos(image, text), 0) per image, as in Hessel et al. 2021."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise TokredError(f"--clip: {model_dir!r} is not a saved CLIP model directory (no config.json)")
    try:
        model = CLIPModel.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise TokredError(f"--clip: cannot load {model_dir!r}: {type(exc).__name__}: {exc}") from None
    size = model.config.vision_config.image_size
    mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)

    def score(images: Tensor, prompts: list[str]) -> Tensor:
        pixels = (F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False) - mean) / std
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        image_features = F.normalize(_embedding(model.get_image_features(pixel_values=pixels)), dim=-1)
        text_features = F.normalize(_embedding(model.get_text_features(**tokens)), dim=-1)
        return 100 * (image_features * text_features).sum(-1).clamp_min(0)

    return score


def prompts_for(run_dir: Path, names: list[str]) -> list[str]:
    """The prompt of each image of a ``tokred generate`` run (image i used prompt i of the config's list)."""
    record_path = run_dir / "record.json"
    if not record_path.is_file():
        raise TokredError(
            f"a CLIP score needs the prompts: {str(record_path)!r} (written by tokred generate) is missing"
        )
    record = json.loads(record_path.read_text())
    prompt = record["config"]["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    by_name = {name: prompts[index % len(prompts)] for index, name in enumerate(record["images"])}
    return [by_name.get(name, prompts[0]) for name in names]


def add_clip_scores(report: dict[str, Any], run_dir: Path, baseline_dir: Path, scorer: TextImageScorer) -> None:
    """CLIP scores of the run's and the baseline's images against the run's prompts."""
    names = [row["image"] for row in report["images"]]
    prompts = prompts_for(run_dir, names)
    with torch.no_grad():
        run = scorer(torch.stack([load_image(run_dir / n) for n in names]), prompts)
        base = scorer(torch.stack([load_image(baseline_dir / n) for n in names]), prompts)
    for row, a, b in zip(report["images"], run.tolist(), base.tolist(), strict=True):
        row["clip_score"], row["clip_score_baseline"] = a, b
    report["summary"]["clip_score"] = float(run.mean())
    report["summary"]["clip_score_baseline"] = float(base.mean())


def finite(value: Any) -> Any:
    """JSON has no infinity: the PSNR of identical images (inf) is written as null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_eval(report: dict[str, Any], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    partial.replace(path)
