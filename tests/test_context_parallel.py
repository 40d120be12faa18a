"""tokred under diffusers' context parallelism (Ulysses, degree 2), in two real processes with gloo on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("context_parallel_worker.py")


def test_ulysses_context_parallel_merges_shard_locally_and_matches_one_process(tmp_path):
    report_path = tmp_path / "cp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKRED_LOAD_PLUGINS": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29541",
            str(WORKER),
            str(report_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["world"] == 2
    assert report["baseline"]["max_difference"] < 1e-5  # diffusers' CP itself reproduces one process
    for mode in ("tokens", "kv", "kv_unweighted", "tokens_mask", "kv_mask"):
        row = report[mode]
        # each rank merged its own 4 of the 8 rows, tiles inside its shard: the one-process tokred run, to rounding
        assert row["grids"] == [[4, 6]] and row["merged_calls"] == 5 and row["tokens"] == [120, 60]
        assert row["max_difference"] < 1e-5, (mode, row)
    baseline = report["baseline"]["elements_sent"]
    assert report["tokens"]["elements_sent"] < baseline  # fewer tokens go through the all-to-all
    assert report["kv_unweighted"]["elements_sent"] < baseline  # K/V reduced before the all-to-all
    assert report["kv_mask"]["elements_sent"] < baseline  # with the bias as a mask (gathered with the keys)
    # folding the bias adds 8 channels to q and k: +50% at this test's head dim 16 (+6% at FLUX's 128)
    assert report["tokens_mask"]["elements_sent"] < report["tokens"]["elements_sent"]
