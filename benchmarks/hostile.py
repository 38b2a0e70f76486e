"""The whole hostile suite (issue 25): every catalogue case (the fast subset of ``make test`` and the slow
ones: real training steps per config number, estimates, subprocess cases, signals against torchrun and
data prepare) and a larger hypothesis budget per property. Prints a table (group, cases, passed,
failed, seconds) and every failure, and writes every verdict as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile.py [--examples 200] [--group checkpoint ...]
        [--fast-only] [--out benchmarks/results/hostile.json] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _record(verdict, seconds: float) -> dict:
    outcome = verdict.outcome
    lines = outcome.stderr.splitlines()
    return {
        "id": verdict.case.id,
        "group": verdict.case.group,
        "fast": verdict.case.fast,
        "passed": verdict.passed,
        "command": ["lockstep", *outcome.argv],
        "exit_code": outcome.code,
        "expected": sorted(verdict.case.expect),
        "stderr_lines": len(lines),
        "first_line": lines[0][:500] if lines else "",
        "last_line": lines[-1][:500] if lines else "",
        "problems": verdict.problems,
        "raised_at": verdict.raised_at,
        "seconds": round(seconds, 3),
    }


def _run_cases(cases, fixtures, work: Path, *, keep: bool) -> list[dict]:
    from tests.hostile.harness import run_case

    records = []
    for index, case in enumerate(cases, 1):
        folder = work / "cases" / f"{index:05d}"
        started = time.perf_counter()
        verdict = run_case(case, fixtures, folder)
        records.append(_record(verdict, time.perf_counter() - started))
        if verdict.passed or not keep:
            shutil.rmtree(folder, ignore_errors=True)
        mark = "ok  " if verdict.passed else "FAIL"
        print(f"[{index}/{len(cases)}] {mark} {case.id} ({records[-1]['seconds']:.2f}s)", flush=True)
    return records


def _run_properties(fixtures, work: Path, examples: int) -> list[dict]:
    from tests.hostile.properties import JSON_PROPERTIES, explore_json, explore_options

    records = []
    for prop in JSON_PROPERTIES:
        started = time.perf_counter()
        verdicts = explore_json(prop, fixtures, work / "properties", examples=examples)
        each = (time.perf_counter() - started) / max(1, len(verdicts))
        records += [_record(v, each) for v in verdicts]
        print(f"property {prop.name}: {sum(v.passed for v in verdicts)}/{len(verdicts)} passed", flush=True)
    started = time.perf_counter()
    verdicts = explore_options(fixtures, work / "properties", examples=examples * 3)
    each = (time.perf_counter() - started) / max(1, len(verdicts))
    records += [_record(v, each) for v in verdicts]
    print(f"property option-gate: {sum(v.passed for v in verdicts)}/{len(verdicts)} passed", flush=True)
    return records


def _table(records: list[dict]) -> list[dict]:
    groups: dict[str, dict] = defaultdict(lambda: {"cases": 0, "passed": 0, "failed": 0, "seconds": 0.0})
    for r in records:
        row = groups[r["group"]]
        row["cases"] += 1
        row["passed" if r["passed"] else "failed"] += 1
        row["seconds"] += r["seconds"]
    return [{"group": name, **row, "seconds": round(row["seconds"], 1)} for name, row in groups.items()]


def _print(table: list[dict], records: list[dict]) -> None:
    print(f"\n{'group':<22} {'cases':>6} {'passed':>7} {'failed':>7} {'seconds':>9}")
    for row in table:
        print(f"{row['group']:<22} {row['cases']:>6} {row['passed']:>7} {row['failed']:>7} {row['seconds']:>9.1f}")
    total = {k: sum(row[k] for row in table) for k in ("cases", "passed", "failed", "seconds")}
    print(f"{'total':<22} {total['cases']:>6} {total['passed']:>7} {total['failed']:>7} {total['seconds']:>9.1f}")
    failed = [r for r in records if not r["passed"]]
    if failed:
        print(f"\n{len(failed)} failing case(s):")
        for r in failed:
            print(f"  {r['id']}: exit {r['exit_code']}: {r['problems'][0][:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="hypothesis examples per JSON property")
    parser.add_argument("--group", action="append", default=[], help="only these case groups (repeatable)")
    parser.add_argument("--fast-only", action="store_true", help="only the cases `make test` runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "hostile.json")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folders of failing cases")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lockstep-hostile-"))
    os.environ.setdefault("LOCKSTEP_CACHE", str(work / "cache"))
    from tests.hostile.cases import CASES
    from tests.hostile.fixtures import build_fixtures

    cases = [c for c in CASES if (not args.group or c.group in args.group) and (c.fast or not args.fast_only)]
    started = time.perf_counter()
    try:
        fixtures = build_fixtures(work / "fixtures")
        print(f"fixtures built in {time.perf_counter() - started:.1f}s; {len(cases)} cases", flush=True)
        records = _run_cases(cases, fixtures, work, keep=args.keep)
        if args.examples > 0 and not args.group:
            records += _run_properties(fixtures, work, args.examples)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    table = _table(records)
    _print(table, records)
    report = {
        "command": " ".join(sys.argv),
        "seconds": round(time.perf_counter() - started, 1),
        "cases": len(records),
        "passed": sum(r["passed"] for r in records),
        "failed": sum(not r["passed"] for r in records),
        "groups": table,
        "results": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
