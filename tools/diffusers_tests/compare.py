"""Compare the junit XML files of the harness runs: counts per run, and the tests a tokred run breaks.

    python compare.py OUT/base.xml OUT/ratio0.xml OUT/ratio0.5.xml [--markdown]

The first file is the reference (no tokred). For every other file it lists the tests that pass in the reference
and do not pass there ("tokred-induced"), with the first line of the failure and whether the test compares against
fixed reference values (``fixed_reference``, recorded by tokred_inject), plus the tests that fail in the reference
and pass there. It also prints the injection counters summed over the run.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def load(path: Path) -> dict[str, dict]:
    """test id -> {outcome, message, properties}"""
    results: dict[str, dict] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = _first_line(node.get("message") or node.text or "")
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        results[test] = {"outcome": outcome, "message": message, "props": props}
    return results


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            return line[:220]
    return ""


def counts(results: dict[str, dict]) -> Counter:
    return Counter(r["outcome"] for r in results.values())


def injection_totals(results: dict[str, dict]) -> dict[str, int]:
    totals: Counter = Counter()
    for r in results.values():
        for key, value in r["props"].items():
            if key.startswith("tokred_"):
                totals[key[len("tokred_") :]] += int(value)
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    args = parser.parse_args(argv)

    runs = {path: load(path) for path in [args.reference, *args.others]}
    print("run                       passed  failed   error skipped   total")
    for path, results in runs.items():
        c = counts(results)
        print(f"{path.stem:24} {c['passed']:7} {c['failed']:7} {c['error']:7} {c['skipped']:7} {len(results):7}")
        totals = injection_totals(results)
        if totals:
            print("    injection: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
            called = [r for r in results.values() if int(r["props"].get("tokred_calls", 0)) > 0]
            merged = [r for r in called if int(r["props"].get("tokred_calls_merged", 0)) > 0]
            print(f"    tests calling a patched pipeline: {len(called)}, merging tokens in some call: {len(merged)}")

    reference = runs[args.reference]
    for path in args.others:
        results = runs[path]
        bad = ("failed", "error")
        outcome = {t: results.get(t, {}).get("outcome") for t in reference}
        broken = [t for t, r in reference.items() if r["outcome"] == "passed" and outcome[t] in bad]
        fixed = [t for t, r in reference.items() if r["outcome"] in bad and outcome[t] == "passed"]
        missing = sorted(set(reference) ^ set(results))
        print(f"\n## {path.stem}: {len(broken)} pass without tokred and fail with it")
        for test in broken:
            r = results[test]
            fixed_ref = " [fixed reference values]" if r["props"].get("fixed_reference") == "1" else ""
            print(f"- {test}{fixed_ref}\n    {r['outcome']}: {r['message']}")
        if fixed:
            print(f"\n   {len(fixed)} fail without tokred and pass with it:")
            for test in fixed:
                print(f"   - {test}")
        if missing:
            print(f"\n   {len(missing)} tests ran in only one of the two runs (collection differences):")
            for test in missing[:20]:
                print(f"   - {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
