"""`make bench`: in-process latency of one hook evaluation.

Two measurements on this machine, one core, no threshold (timing never decides a test):

1. The scenario corpus: `evaluate_request(parse_request(raw))` (CDS envelope, FHIR reading with the
   targeted checks of `fhir_mappings.access`, fact mapping, all rules, cards) per scenario, repeated;
   p50/p90/p99 and throughput.
2. The 40-resource prefetch of `tests/support/large_request.py` (an order-sign as a real chart sends
   it, the body the HTTP bench posts), step by step: ``orjson.loads`` of the request body (what any
   endpoint pays), the CDS envelope (`parse_request`, pydantic), reading the chart into a `Case`
   (`index_prefetch` + `build_case`, part of `evaluate_request`), `evaluate_request` alone, and all.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import orjson

from cds_hooks.service import evaluate_request, parse_request
from fhir_mappings import build_case, index_prefetch, parse_bundle_entries

HERE = Path(__file__).parent / "scenarios"
ROUNDS = 30
LARGE_ROUNDS = 2000


def _ms(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


def _timed(step: Callable[[], Any], rounds: int) -> list[float]:
    for _ in range(max(10, rounds // 10)):  # warm-up
        step()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def corpus(out: TextIO) -> int:
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
    for _, raw, now, zone, _ in cases:  # warm-up: imports, code lists
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
    out.write(f"evaluate_request over {len(cases)} scenarios x {ROUNDS} rounds (in-process, one core)\n")
    out.write(
        f"  p50 {_ms(samples, 0.50):.2f} ms  p90 {_ms(samples, 0.90):.2f} ms  p99 {_ms(samples, 0.99):.2f} ms"
        f"  max {max(samples) * 1000:.2f} ms\n"
    )
    out.write(f"  throughput {len(samples) / elapsed:.0f} evaluations/s\n")
    out.write("  slowest scenarios (median ms, prefetch resources):\n")
    for median, name, n in sorted(per_case, reverse=True)[:5]:
        out.write(f"    {median * 1000:6.2f}  {n:3d}  {name}\n")
    return 0


def large(out: TextIO) -> None:
    try:  # shared with the HTTP bench (tests/bench_http.py), which posts the same body
        from tests.support.large_request import count_resources, large_order_sign
    except ImportError:
        out.write("\n40-resource prefetch: tests/support/large_request.py not found, not measured\n")
        return
    raw, now, zone = large_order_sign()
    body = orjson.dumps(raw)
    request = parse_request(raw)
    prefetch = {k: v for k, v in raw["prefetch"].items() if k != "patient"}
    drafts = parse_bundle_entries(raw["context"]["draftOrders"], "context.draftOrders")

    def read_chart() -> Any:
        return build_case(
            patient=raw["prefetch"]["patient"],
            drafts=[d for _, d in drafts],
            draft_paths=[p for p, _ in drafts],
            chart=index_prefetch(prefetch),
            now=now,
            zone=zone,
        )

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("orjson.loads(body)", lambda: orjson.loads(body)),
        ("parse_request (CDS envelope)", lambda: parse_request(raw)),
        ("index_prefetch + build_case", read_chart),
        ("evaluate_request", lambda: evaluate_request(request, now=now, zone=zone)),
        (
            "loads + parse_request + evaluate",
            lambda: evaluate_request(parse_request(orjson.loads(body)), now=now, zone=zone),
        ),
    ]
    out.write(
        f"\norder-sign with a {count_resources(raw)}-resource prefetch ({len(body):,} bytes of JSON), "
        f"{LARGE_ROUNDS} rounds\n"
    )
    for label, step in steps:
        samples = _timed(step, LARGE_ROUNDS)
        out.write(f"  {label:34} p50 {_ms(samples, 0.5):7.3f} ms  p99 {_ms(samples, 0.99):7.3f} ms\n")


def main() -> int:
    status = corpus(sys.stdout)
    if status == 0:
        large(sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
