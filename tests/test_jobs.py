"""The command-line jobs: generate, bench, eval and sweep, on the built-in offline sources."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokred import cli
from tokred.jobs.evaluate import evaluate, frechet_distance, psnr, ssim

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = cli.main([*argv, "--quiet"] if argv and argv[0] in ("bench", "generate", "eval", "sweep") else list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


# --- generate ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny:sdxl", "tiny:flux"])
def test_generate_writes_pngs_and_a_record(capsys, tmp_path, model):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "generate",
        "toma",
        f"model={model}",
        "steps=2",
        "height=128",
        "width=192",
        "prompt=[a squirrel,a house]",
        "--out",
        str(out),
    )
    assert code == 0, err
    record = json.loads((out / "record.json").read_text())
    assert record["images"] == ["000.png", "001.png"]
    assert all(valid_png(out / name) == (192, 128) for name in record["images"])
    assert record["config"]["model"] == model and record["seed"] == 0
    assert record["stats"]["total"]["tokens_out"] < record["stats"]["total"]["tokens_in"]
    assert {"tokred", "torch", "diffusers"} <= set(record["versions"]) and record["seconds"] > 0
    assert "tokens kept" in stdout


def test_generate_from_a_saved_local_pipeline(capsys, tmp_path):
    from tokred.jobs.testbed import tiny_sdxl_pipeline

    saved = tmp_path / "pipe"
    tiny_sdxl_pipeline().save_pretrained(saved)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "generate", "toma", f"model={saved}", "steps=2", "height=128", "width=128", "--out", str(out)
    )
    assert code == 0, err
    assert valid_png(out / "000.png") == (128, 128)


def test_generate_is_reproducible_and_ratio_zero_is_the_baseline(capsys, tmp_path):
    args = ("model=tiny:sdxl", "steps=2", "height=128", "width=128", "seed=3")
    for name, extra in (("a", "ratio=0.5"), ("b", "ratio=0.5"), ("base", "ratio=0")):
        assert run_cli(capsys, "generate", "toma", *args, extra, "--out", str(tmp_path / name))[0] == 0
    read = lambda name: (tmp_path / name / "000.png").read_bytes()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("base")
    assert json.loads((tmp_path / "base" / "record.json").read_text())["stats"] is None


def test_a_failed_generate_leaves_no_result_that_looks_complete(capsys, tmp_path, monkeypatch):
    import tokred.jobs.generate

    def broken():
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokred.jobs.generate, "versions", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(["generate", "toma", "model=tiny:sdxl", "steps=1", "height=64", "width=64", "--out", str(out)])
    assert not out.exists()
    assert not list(tmp_path.glob(".run.partial-*"))  # the temporary directory went with the failure


# --- bad inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["generate", "toma", "model=nope:sdxl"],
            "unknown model source 'nope:sdxl': not a built-in (tiny:sdxl, tiny:flux, random:sdxl, random:flux, ",
        ),
        (["generate", "toma", "model=tiny:sdxl", "bogus=1"], "bogus: unknown key 'bogus'"),
        (
            ["generate", "toma", "model=random:sdxl", "model_options.depth=11"],
            "model_options.depth: Input should be less than or equal to 10",
        ),
        (["generate", "toma", "model=tiny:sdxl", "steps=0"], "steps: Input should be greater than or equal to 1"),
        (["bench", "model=tiny:sdxl", "methods=[toma]"], "methods: must start with baseline"),
        (["bench", "model=tiny:sdxl", "methods=[baseline,tomaa]"], "methods.1: unknown method 'tomaa'"),
        (
            ["bench", "repeat=2"],
            "repeat: unknown key 'repeat' (did you mean 'repeats'?); allowed: model, model_options",
        ),
        (["sweep", "grid.methods=[toma,nope]"], "grid.methods.1"),
        (["bench", "methods=[baseline,toma[ratio=0.6]]"], "methods: cannot parse the value as YAML"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(capsys, tmp_path, argv, fragment):
    code, stdout, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2, err
    assert fragment in err and "Traceback" not in err and stdout == ""
    assert not (tmp_path / "out").exists()


def test_out_never_replaces_what_is_not_a_tokred_result(capsys, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "generate", "toma", "model=tiny:sdxl", "--out", str(precious))
    assert code == 2 and "holds files that are not a tokred result" in err
    assert (precious / "thesis.tex").read_text() == "years of work"
    code, _, err = run_cli(capsys, "bench", "model=tiny:sdxl", "--out", str(precious / "thesis.tex"))
    assert code == 2 and "is a file, not a directory" in err
    rerun = tmp_path / "run"  # an earlier result in the same place is replaced
    for _ in range(2):
        code, _, err = run_cli(
            capsys, "generate", "toma", "model=tiny:sdxl", "steps=1", "height=64", "width=64", "--out", str(rerun)
        )
        assert code == 0, err
    assert sorted(p.name for p in rerun.iterdir()) == ["000.png", "record.json"]


def test_unwritable_out_and_missing_baseline_exit_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "generate", "toma", "model=tiny:sdxl", "--out", str(blocker / "run"))
    assert code == 2 and "--out: cannot write to" in err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code, _, err = run_cli(
        capsys, "eval", str(run_dir), "--baseline", str(tmp_path / "missing"), "--out", str(tmp_path / "eval")
    )
    assert code == 2 and "--baseline" in err and "is not a directory" in err
    assert not (tmp_path / "eval").exists()


# --- bench ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny:sdxl", "tiny:flux"])
def test_bench_writes_table_json_csv_and_two_pictures(capsys, tmp_path, model):
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        capsys, "bench", f"model={model}", "height=128", "width=128", "repeats=1", "--out", str(out)
    )
    assert code == 0, err
    report = json.loads((out / "bench.json").read_text())
    names = [row["name"] for row in report["rows"]]
    expected = ["baseline", "toma", "random", "grid", "todo"] + (["tomesd"] if model == "tiny:sdxl" else [])
    assert names == expected
    assert stdout.startswith("tokred bench: ") and all(name in stdout for name in names)
    if model == "tiny:flux":
        assert "note: tomesd: skipped (it patches UNets only)" in stdout
    with (out / "bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == names and float(rows[0]["speedup"]) == 1.0
    assert valid_png(out / "speed_vs_deviation.png")[0] > 100
    assert valid_png(out / "toma_destinations.png")[0] > 100
    assert report["setup"]["model_options"] == {} and f"tokred bench: {model} at 128x128" in stdout
    picture = report["setup"]["destinations_picture"]
    assert picture["destinations"] == picture["tokens"] // 2
    assert not (tmp_path / "bench.partial").exists()


def test_bench_config_file_and_default(tmp_path):
    from tokred.bench.job import BenchConfig, load_bench_config

    path = tmp_path / "b.yaml"
    path.write_text("model: tiny:sdxl\nmethods: [baseline, toma_stripe]\nratio: null\n")
    config = load_bench_config(str(path), ["repeats=2"])
    assert (config.model, config.methods, config.ratio, config.repeats) == (
        "tiny:sdxl",
        ["baseline", "toma_stripe"],
        None,
        2,
    )
    default = load_bench_config(None, [])
    assert default == BenchConfig() and default.model == "random:sdxl" and default.height == 1024


# --- eval ----------------------------------------------------------------------------------------------------


def _images(directory: Path, seed: int, noise: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    for index in range(3):
        image = (base + noise * torch.randn(3, 32, 32, generator=gen) + 0.1 * index).clamp(0, 1)
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(directory / f"{index:03d}.png")


def test_metrics_behave():
    a = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (a + 0.05 * torch.randn(3, 32, 32)).clamp(0, 1)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    assert 20 < psnr(a, noisy) < 40 and ssim(a, noisy) < 0.99
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 3) == pytest.approx(36.0, rel=1e-6)


def test_eval_with_an_injected_feature_network(tmp_path):
    _images(tmp_path / "base", seed=1, noise=0.0)
    _images(tmp_path / "run", seed=2, noise=0.05)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    calls = []

    def features(images):
        calls.append(images.shape)
        return net(images)

    report = evaluate(tmp_path / "run", tmp_path / "base", features)
    summary = report["summary"]
    assert summary["images"] == 3 and 20 < summary["psnr"] < 40 and 0 < summary["ssim"] < 1
    assert 0.5 < summary["feature_similarity"] <= 1.0 and summary["fid"] >= 0
    assert calls == [(3, 3, 32, 32), (3, 3, 32, 32)]
    same = evaluate(tmp_path / "base", tmp_path / "base", features)["summary"]
    assert same["feature_similarity"] == pytest.approx(1.0) and same["fid"] == pytest.approx(0.0, abs=1e-4)


def test_eval_cli_with_a_saved_local_vision_model(capsys, tmp_path):
    from transformers import ViTConfig, ViTModel

    _images(tmp_path / "base", seed=1, noise=0.0)
    _images(tmp_path / "run", seed=2, noise=0.05)
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path / "vit")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        str(tmp_path / "run"),
        "--baseline",
        str(tmp_path / "base"),
        "--features",
        str(tmp_path / "vit"),
        "--out",
        str(out),
    )
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert set(report["summary"]) == {"images", "psnr", "ssim", "feature_similarity", "fid"}
    assert "FD(features)" in stdout and len(report["images"]) == 3
    code, _, err = run_cli(
        capsys,
        "eval",
        str(tmp_path / "run"),
        "--baseline",
        str(tmp_path / "base"),
        "--features",
        str(tmp_path),
        "--out",
        str(out),
    )
    assert code == 2 and "not a saved transformers model directory" in err


def test_eval_cli_clip_score_against_the_run_prompts(capsys, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from tokred.jobs.testbed import clip_tokenizer

    runs = {}
    for name, ratio in (("run", "0.5"), ("base", "0")):
        runs[name] = tmp_path / name
        code, _, err = run_cli(
            capsys,
            "generate",
            "toma",
            "model=tiny:sdxl",
            "steps=1",
            "height=64",
            "width=64",
            f"ratio={ratio}",
            "prompt=[a red cube,a blue ball]",
            "--out",
            str(runs[name]),
        )
        assert code == 0, err
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    clip_tokenizer().save_pretrained(tmp_path / "clip")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        str(runs["run"]),
        "--baseline",
        str(runs["base"]),
        "--clip",
        str(tmp_path / "clip"),
        "--out",
        str(out),
    )
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert 0 <= report["summary"]["clip_score"] <= 100 and "clip_score_baseline" in report["summary"]
    assert [row["image"] for row in report["images"]] == ["000.png", "001.png"]
    assert "CLIP score" in stdout


# --- sweep ---------------------------------------------------------------------------------------------------

SWEEP = """
run: {model: "tiny:sdxl", steps: 2, height: 64, width: 64}
grid:
  methods: [baseline, toma, random]
  ratios: [0.3, 0.6]
  seeds: [0, 1]
  prompts: ["a squirrel"]
"""


def _sweep_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_sweep_expands_with_stable_ids_and_resumes(tmp_path):
    from tokred.jobs.sweep import expand, load_sweep_config, run_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    config = load_sweep_config(str(path), [])
    items = expand(config)
    assert len(items) == 2 + 2 * 2 * 2  # baseline once per seed; others per ratio and seed
    assert [i["id"] for i in items] == [i["id"] for i in expand(load_sweep_config(str(path), []))]
    summary = run_sweep(config, tmp_path / "out")
    assert summary["ran_here"] == 10 and summary["skipped_here"] == 0
    rows = _sweep_rows(tmp_path / "out")
    assert [r["id"] for r in rows] == [i["id"] for i in items]
    assert all(r["psnr"] is None and r["ssim"] == 1.0 for r in rows if r["method"] == "baseline")  # inf: null
    assert all(r["psnr"] < 100 for r in rows if r["method"] != "baseline")
    again = run_sweep(config, tmp_path / "out")
    assert again["ran_here"] == 0 and again["skipped_here"] == 10
    bigger = load_sweep_config(str(path), ["grid.seeds=[0,1,2]"])
    more = run_sweep(bigger, tmp_path / "out")
    assert more["ran_here"] == 5 and more["skipped_here"] == 10
    lines = (tmp_path / "out" / "results.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 15 and len({json.loads(line)["id"] for line in lines}) == 15


def test_sweep_under_torchrun_equals_the_single_process_run(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKRED_LOAD_PLUGINS": ""}
    single = subprocess.run(
        [sys.executable, "-m", "tokred", "sweep", str(path), "--out", str(tmp_path / "one"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "tokred",
            "sweep",
            str(path),
            "--out",
            str(tmp_path / "two"),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "10 items (2 process(es))" in multi.stdout
    one, two = _sweep_rows(tmp_path / "one"), _sweep_rows(tmp_path / "two")
    assert [r["id"] for r in one] == [r["id"] for r in two]  # every item exactly once, in grid order
    assert sorted(r["rank"] for r in two) == [0] * 5 + [1] * 5
    for a, b in zip(one, two, strict=True):
        assert (a["psnr"], a["ssim"], a["tokens_kept"]) == (b["psnr"], b["ssim"], b["tokens_kept"])
        image_a = (tmp_path / "one" / "items" / a["id"] / "000.png").read_bytes()
        assert image_a == (tmp_path / "two" / "items" / b["id"] / "000.png").read_bytes()
    for rank in (0, 1):
        lines = (tmp_path / "two" / f"results.rank{rank}.jsonl").read_text().splitlines()
        assert len(lines) == 5


def test_published_result_directories_are_ordinary_directories(tmp_path):
    from tokred.jobs.results import publish_dir

    out = tmp_path / "result"
    publish_dir(out, lambda partial: (partial / "a.txt").write_text("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~mask)
    with pytest.raises(RuntimeError):
        publish_dir(out, lambda partial: (_ for _ in ()).throw(RuntimeError("boom")))
    assert (out / "a.txt").read_text() == "x"  # a failed write leaves the earlier result alone
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_bench_methods_take_their_own_settings_in_brackets(capsys, tmp_path):
    out = tmp_path / "bench"
    code, _, err = run_cli(
        capsys,
        "bench",
        "model=tiny:flux",
        "height=128",
        "width=128",
        "repeats=1",
        "methods=[baseline,'toma[proportional=mask]','toma[proportional=off,ratio=0.25]',toma]",
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["baseline", "toma[proportional=mask]", "toma[proportional=off,ratio=0.25]", "toma"]
    assert rows["toma[proportional=off,ratio=0.25]"]["tokens_kept"] == pytest.approx(0.75, abs=0.02)
    assert rows["toma"]["tokens_kept"] == pytest.approx(0.5, abs=0.02)
    # the same math: mask and fold (auto) agree to rounding; off differs
    assert rows["toma[proportional=mask]"]["deviation"] == pytest.approx(rows["toma"]["deviation"], rel=1e-3)
    for argv, fragment in (
        (["methods=[baseline,'toma[proportional=maybe]']"], "proportional"),
        (["methods=[baseline,'tomesd[ratio=0.2]']"], "tomesd takes no settings"),
        (["methods=[baseline,toma,toma]"], "each method at most once"),
    ):
        code, _, err = run_cli(capsys, "bench", "model=tiny:sdxl", *argv, "--out", str(tmp_path / "x"))
        assert code == 2 and fragment in err, err


def test_bench_measures_step_caches_alone_and_under_tokred(capsys, tmp_path):
    out = tmp_path / "bench"
    code, _, err = run_cli(
        capsys,
        "bench",
        "model=tiny:flux",
        "height=128",
        "width=128",
        "steps=4",
        "repeats=1",
        "methods=[baseline,dbcache,fbc,toma,toma+fbc]",
        "cache_options.fbc.threshold=100",  # skips every step after the first: the FLOPs show it
        "cache_options.dbcache.threshold=100",
        "--out",
        str(out),
    )
    assert code == 0, err  # fbc after dbcache: cache-dit's leftovers are undone between methods
    report = json.loads((out / "bench.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    text = (out / "bench.txt").read_text()
    assert report["setup"]["steps"] == 4 and "4 denoising steps" in text
    assert "fbc: diffusers' FirstBlockCache (threshold=100" in text
    assert rows["fbc"]["flop_speedup"] > 1.5 and rows["dbcache"]["flop_speedup"] > 1.5
    assert rows["toma+fbc"]["flop_speedup"] > rows["fbc"]["flop_speedup"]
    assert rows["toma+fbc"]["tokens_kept"] == pytest.approx(0.5, abs=0.02)
    assert rows["fbc"]["deviation"] > 0 and rows["toma"]["deviation"] > 0
    for argv, fragment in (
        (["methods=[baseline,fbc]"], "steps: method 'fbc' runs a step cache: it needs steps of 2 or more"),
        (["steps=3", "methods=[baseline,toma+fbc+pab]"], "at most one tokred preset and one cache"),
        (["steps=3", "methods=[baseline,tomesd+fbc]"], "a cache goes alone or under a tokred preset"),
        (["steps=3", "cache_options.fbc.thresh=1"], "cache 'fbc' has no setting 'thresh'; allowed: threshold"),
        (["steps=3", "cache_options.magic.x=1"], "cache_options.magic: unknown cache; available: fbc"),
        (["steps=3", "methods=[baseline,'fbc[threshold=0.3]']"], "set the cache's as cache_options.fbc.<key>"),
    ):
        code, _, err = run_cli(capsys, "bench", "model=tiny:flux", *argv, "--out", str(tmp_path / "x"))
        assert code == 2 and fragment in err, err


def test_the_gpu_check_configs_validate():
    from tokred.bench.job import load_bench_config, parse_method
    from tokred.config import load_config

    for family, preset in (("sdxl", "toma"), ("flux", "toma_flux")):
        config = load_bench_config(str(REPO / "scripts" / "gpu" / f"{family}.yaml"), [])
        assert config.device == "cuda" and config.dtype == "bf16" and config.methods[0] == "baseline"
        methods = [parse_method(m) for m in config.methods]
        ways = {load_config(name, **own).proportional for name, own in methods if name == preset}
        assert ways == {"auto", "mask", "off"}


def test_generate_sd3_images_and_wan_videos(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "toma", "model=tiny:sd3", "steps=2", "--out", str(tmp_path / "sd3"))
    assert code == 0, err
    record = json.loads((tmp_path / "sd3" / "record.json").read_text())
    assert record["images"] == ["000.png"] and valid_png(tmp_path / "sd3" / "000.png") == (128, 128)
    out = tmp_path / "wan"
    code, _, err = run_cli(
        capsys, "generate", "toma", "model=tiny:wan", "steps=2", "frames=5", "width=48", "--out", str(out)
    )
    assert code == 0, err
    record = json.loads((out / "record.json").read_text())
    assert record["images"] == ["000.gif", "000_frames.png"]
    assert record["stats"]["total"]["tokens_out"] < record["stats"]["total"]["tokens_in"]
    assert valid_png(out / "000_frames.png") == (5 * 48, 64)  # five frames side by side
    with Image.open(out / "000.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (48, 64)


@pytest.mark.parametrize("model", ["tiny:sd3", "tiny:wan"])
def test_bench_on_the_new_families(capsys, tmp_path, model):
    out = tmp_path / "bench"
    code, _, err = run_cli(capsys, "bench", f"model={model}", "height=64", "width=64", "repeats=1", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["baseline", "toma", "random", "grid", "todo"]
    assert all(r["tokens_kept"] < 1 for r in rows[1:]) and valid_png(out / "toma_destinations.png")[0] > 100
