"""`python -m tests.bench_seed`: how fast the sandbox population is made and loaded (timing never decides a test).

1. Generation of 1,000 and 10,000 patients (`sandbox.seed.generate`, each Bundle serialized with orjson
   as `write` does, nothing kept): seconds, resources, MB of JSON. Each size runs in a fresh interpreter,
   so its peak RSS (``resource.getrusage``) is its own; the baseline is an interpreter that only
   imported the modules. A second run of the 1,000 under ``tracemalloc`` gives the peak of the
   generator's own allocations (tracemalloc slows Python several-fold, so it is not timed).
2. Loading 1,000 patients into the sandbox FHIR engine (Medplum, validating every resource) with
   `sandbox.seed.load`, four Bundles at a time: seconds and resources per second.

    .venv/bin/python -m tests.bench_seed [--sizes 1000,10000] [--load 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from datetime import date

import orjson

TODAY = date(2026, 11, 21)


def _generate(patients: int, seed: int) -> dict[str, float]:
    from sandbox.seed import generate

    started = time.perf_counter()
    count = size = 0
    for bundle in generate(patients, seed, TODAY):
        size += len(orjson.dumps(bundle))
        count += len(bundle["entry"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "resources": count, "mb": size / 1e6, "rss_mb": _rss_mb()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench_seed", *args], capture_output=True, text=True, check=True, timeout=900
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _traced_peak_mb(patients: int, seed: int) -> float:
    from sandbox.seed import generate

    tracemalloc.start()
    for bundle in generate(patients, seed, TODAY):
        orjson.dumps(bundle)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6


def _load(patients: int, seed: int) -> dict[str, float]:
    from sandbox.fhir_engine import start_fhir_server
    from sandbox.seed import generate, load

    with start_fhir_server() as server:
        started = time.perf_counter()
        written = load(server.base, generate(patients, seed, TODAY))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "resources": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_seed")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--load", type=int, default=1000, help="patients to load into the FHIR engine (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", choices=("generate", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--patients", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = sys.stdout
    if args.child == "baseline":
        import sandbox.seed  # noqa: F401 (what the measured children import)

        out.write(json.dumps({"rss_mb": _rss_mb()}) + "\n")
        return 0
    if args.child == "generate":
        out.write(json.dumps(_generate(args.patients, args.seed)) + "\n")
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    baseline = _child(["--child", "baseline"])["rss_mb"]
    out.write(f"sandbox seed: generation (one fresh interpreter each; baseline RSS {baseline:.0f} MB)\n")
    out.write(f"{'patients':>9} {'resources':>10} {'JSON MB':>8} {'seconds':>8} {'res/s':>9} {'peak RSS MB':>12}\n")
    for n in sizes:
        r = _child(["--child", "generate", "--patients", str(n), "--seed", str(args.seed)])
        out.write(
            f"{n:>9} {int(r['resources']):>10} {r['mb']:>8.0f} {r['seconds']:>8.2f} "
            f"{r['resources'] / r['seconds']:>9.0f} {r['rss_mb']:>12.0f}\n"
        )
    if sizes:
        n = min(sizes)
        out.write(f"tracemalloc peak while generating {n} patients: {_traced_peak_mb(n, args.seed):.1f} MB\n")
    if args.load:
        r = _load(args.load, args.seed)
        out.write(
            f"load {args.load} patients into the FHIR engine (batch Bundles of 50, 4 at a time): "
            f"{int(r['resources'])} resources in {r['seconds']:.1f} s ({r['resources'] / r['seconds']:.0f}/s)\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
