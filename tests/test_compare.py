"""Side-by-side comparison machinery: FLOP counting, interleaved timing, deviation, peers."""

from __future__ import annotations

import pytest
import torch
from test_sdxl import unet_inputs

from tokred.bench.compare import Method, compare, format_rows
from tokred.bench.flops import count_flops
from tokred.jobs.testbed import TINY_SDXL_UNET_CONFIG, unet_from_config


def test_flop_count_includes_cpu_attention_and_matmuls():
    q = torch.randn(2, 3, 64, 16)
    _, flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 4 * 2 * 3 * 64 * 64 * 16
    a, b = torch.randn(5, 7), torch.randn(7, 11)
    _, flops = count_flops(lambda: a @ b)
    assert flops == 2 * 5 * 7 * 11


def test_compare_baseline_tokred_and_tomesd_on_a_tiny_unet():
    unet = unet_from_config(TINY_SDXL_UNET_CONFIG)
    sample, t, ehs, kwargs = unet_inputs(unet, height=32, width=32)
    with torch.no_grad():
        before = unet(sample, t, ehs, **kwargs).sample
    methods = [
        Method("baseline", "baseline"),
        Method("toma", config="toma", overrides={"ratio": 0.5}),
        Method("tomesd", "tomesd", config={"ratio": 0.5, "max_downsample": 2}),
    ]
    labels = []
    rows = compare(unet, lambda: unet(sample, t, ehs, **kwargs), methods, repeats=2, progress=labels.append)
    by = {row.name: row for row in rows}
    assert labels[-1] == "round 2/2: tomesd" and len(labels) == 3 + 2 * 3
    assert by["baseline"].deviation == 0 and by["baseline"].speedup == 1.0
    assert by["toma"].deviation > 0 and by["tomesd"].deviation > 0
    assert by["toma"].flop_speedup > 1.0 and by["toma"].flops < by["baseline"].flops
    assert by["toma"].tokens_kept == pytest.approx(0.5, abs=0.02)
    assert by["toma"].plan_seconds > 0 and by["baseline"].plan_seconds == 0
    assert all(len(row.times) == 2 and min(row.times) > 0 for row in rows)
    with torch.no_grad():
        assert torch.equal(unet(sample, t, ehs, **kwargs).sample, before)  # every method was detached
    table = format_rows(rows)
    assert table.splitlines()[0].split()[:3] == ["method", "time", "s"] and "toma" in table


def test_compare_needs_the_baseline_first():
    with pytest.raises(ValueError, match="baseline"):
        compare(torch.nn.Linear(2, 2), lambda: None, [Method("toma")])


def test_bench_sdxl_block_and_unet_at_test_size():
    from tokred.bench import sdxl as bench_sdxl
    from tokred.jobs.testbed import TINY_SDXL_UNET_CONFIG

    rows, setup = bench_sdxl.bench_block(dim=32, heads=2, cross_dim=16, grid=8, batch=1, repeats=1)
    assert [row.name for row in rows] == ["baseline", "toma attn1", "toma attn1+ff"]
    assert rows[2].flop_speedup > rows[1].flop_speedup > 1.0
    assert setup["grid"] == [8, 8]
    rows, setup = bench_sdxl.bench_unet(size=128, repeats=1, config=dict(TINY_SDXL_UNET_CONFIG))
    assert [row.name for row in rows] == ["baseline", "tokred toma", "tomesd"] and setup["tomesd"]
    assert all(row.deviation > 0 for row in rows[1:])


def test_bench_flux_at_test_size():
    from tokred.bench import flux as bench_flux
    from tokred.jobs.testbed import TINY_FLUX_CONFIG

    rows, setup = bench_flux.bench_flux(
        double=1, single=2, size=128, text_len=7, repeats=1, config=dict(TINY_FLUX_CONFIG, in_channels=16)
    )
    assert [row.name for row in rows] == ["baseline", "toma tokens", "toma kv"]
    assert setup["image_tokens"] == 64 and setup["text_tokens"] == 7
    assert rows[1].flop_speedup > 1.0 and rows[2].flops != rows[0].flops  # kv at this size: plan costs more
    assert rows[1].tokens_kept == pytest.approx(0.5) and all(row.deviation > 0 for row in rows[1:])
