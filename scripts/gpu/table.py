"""One Markdown table from several ``tokred bench`` results (bench.json files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    print("| model | method | time ms | speedup | FLOP model | efficiency | deviation | plan share | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        report = json.loads(Path(path).read_text())
        setup = report["setup"]
        label = f"{setup['model']} {setup['height']}x{setup['width']} b{setup['batch']} {setup.get('dtype', '')}"
        for row in report["rows"]:
            peak = f"{row['peak_memory']:.2f}" if row.get("peak_memory") is not None else "-"
            print(
                f"| {label} | {row['name']} | {1000 * row['seconds']:.1f} | {row['speedup']:.2f}x | "
                f"{row['flop_speedup']:.2f}x | {row['efficiency']:.2f} | {row['deviation']:.4f} | "
                f"{100 * row['plan_share']:.1f}% | {peak} |"
            )
    print()
    print(f"device: {setup['device']}; torch {setup.get('torch')}; medians of {setup['repeats']} interleaved rounds")


if __name__ == "__main__":
    main(sys.argv[1:])
