"""`make bench`: in-process latency of one hook evaluation over the scenario corpus.

Measures `evaluate_request` (request validation, R4B parsing of every resource, fact mapping, all
rules, card building) per scenario, repeated, and reports p50/p99 and throughput on this machine.
No threshold: timing never decides a test.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from cds_hooks.service import evaluate_request, parse_request

HERE = Path(__file__).parent / "scenarios"
ROUNDS = 30


def main() -> int:
    cases = []
    for exp_path in sorted(HERE.glob("*/expected.json")):
        exp = json.loads(exp_path.read_text(encoding="utf-8"))
        raw = json.loads((exp_path.parent / "request.json").read_text(encoding="utf-8"))
        n_resources = sum(
            len(v.get("entry", [])) if isinstance(v, dict) and v.get("resourceType") == "Bundle" else 1
            for v in (raw.get("prefetch") or {}).values()
            if v is not None
        )
        cases.append(
            (exp_path.parent.name, raw, datetime.fromisoformat(exp["now"]), ZoneInfo(exp["timezone"]), n_resources)
        )
    if not cases:
        sys.stderr.write("no scenarios found\n")
        return 1
    for _, raw, now, zone, _ in cases:  # warm-up: imports, model schemas, code lists
        evaluate_request(parse_request(raw), now=now, zone=zone)
    samples: list[float] = []
    per_case: list[tuple[float, str, int]] = []
    started = time.perf_counter()
    for name, raw, now, zone, n in cases:
        mine = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            evaluate_request(parse_request(raw), now=now, zone=zone)
            mine.append(time.perf_counter() - t0)
        samples.extend(mine)
        per_case.append((statistics.median(mine), name, n))
    elapsed = time.perf_counter() - started
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p * len(samples)))] * 1000

    out = sys.stdout
    out.write(f"evaluate_request over {len(cases)} scenarios x {ROUNDS} rounds (in-process, one core)\n")
    out.write(
        f"  p50 {pct(0.50):.2f} ms  p90 {pct(0.90):.2f} ms  p99 {pct(0.99):.2f} ms  max {samples[-1] * 1000:.2f} ms\n"
    )
    out.write(f"  throughput {len(samples) / elapsed:.0f} evaluations/s\n")
    out.write("  slowest scenarios (median ms, prefetch resources):\n")
    for median, name, n in sorted(per_case, reverse=True)[:5]:
        out.write(f"    {median * 1000:6.2f}  {n:3d}  {name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
