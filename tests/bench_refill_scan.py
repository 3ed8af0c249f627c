"""`python -m tests.bench_refill_scan`: the refill scan over 1,000 and 10,000 seeded patients, next to bare paging
(timing never decides a test; the bench only reports and always exits 0 when it could measure).

For each population (`sandbox.seed.generate` with the same seed, written to a directory and loaded into a
fresh FHIR engine with ``--load``; the loading time is reported apart and counts in nothing else):

1. **scan**: `cds_hooks.refill_scan.RefillScanner.scan` as the service runs it (default `ScanOptions`,
   the service's httpx limits), straight on the engine with no auth (``FhirClient(auth=None)``), storing
   into a **file SQLite** store in a temp dir (a new file each run, so every run creates the same drafts).
   Wall time, patients per second, drafts created.
2. **bare paging**: the same HTTP requests with nothing done with the answers. `BarePaging` is the
   scanner itself with its judging and storing (``_apply``) and the final withdrawal (``_withdraw_unseen``)
   replaced by nothing, so the URLs, page sizes, batching and concurrency are the scan's own and cannot
   drift: every response is still parsed (orjson) and checked by `FhirClient`, and each batch's results
   are split per patient as the scan does, then dropped. The bench checks that both issued the same
   multiset of request URLs (count and digest).
3. **memory of the scan**: each run is a fresh child interpreter; its peak RSS (``ru_maxrss``) at the end
   minus its current RSS (``VmRSS``) just before the scan starts, i.e. what the scan added. One more child
   per population runs the scan under ``tracemalloc`` (started just before the scan; its peak is the
   Python allocations of the scan alone; tracemalloc slows Python, so that run is not timed).

Each of scan and bare paging runs ``--runs`` times (default 2) after one warm-up bare pass (Node's JIT and
the engine's indexes warm), alternating; times are the best run (the median is shown too). Targets
reported, PASS/MISS: scan ≤ 2.0× bare paging, and scan memory flat from the smallest to the largest
population (≤ 1.5×). The engine (Node) and the scanning Python share this machine's cores.

    .venv/bin/python -m tests.bench_refill_scan [--patients 1000,10000] [--runs 2] [--seed 1]
        [--no-tracemalloc] [--breakdown]

``--breakdown`` adds one scan child per population that sums where the scan's time goes (FHIR requests
awaited, JSON parsing, per-patient planning, SQLite writes), with the functions wrapped by timers in
that child only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
TODAY = date(2026, 11, 21)
ZONE = "America/New_York"
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=ZoneInfo(ZONE))
LOAD_TIMEOUT_S = 3600.0
CHILD_TIMEOUT_S = 3600.0
FHIR_TIMEOUT_S = 120.0
"""Per request: generous, so a slow answer of the engine under load shows as time, not as a failed batch."""
SPEED_TARGET = 2.0
MEMORY_TARGET = 1.5


# --- the child: one scan (or bare paging) in a fresh interpreter -----------------------------------


def _rss_now_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _bare_paging_class() -> type[Any]:
    from cds_hooks.refill_scan import RefillScanner, ScanReport
    from cds_hooks.refills import PatientChart

    class BarePaging(RefillScanner):
        """The scan's fetch path (same requests, same concurrency), nothing judged, stored or withdrawn."""

        def _apply(self, charts: dict[str, PatientChart], now: datetime, report: ScanReport) -> None:
            return None

        def _withdraw_unseen(self, seen: set[str], now: datetime) -> int:
            return 0

    return BarePaging


class _Timers:
    """Seconds summed per component, across threads (wall and the thread's own CPU time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        with self.lock:
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - w, time.thread_time() - c)

        return timed

    def wrap_async(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            w = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - w, 0.0)

        return timed

    def as_json(self) -> dict[str, Any]:
        return {k: {"wall": self.wall[k], "cpu": self.cpu[k], "calls": self.calls[k]} for k in self.wall}


def _instrument() -> _Timers:
    """Wrap, in this child only, the functions the scan spends its time in."""
    import orjson

    import cds_hooks.fhir_client as fhir_client
    import cds_hooks.refill_scan as refill_scan
    from cds_hooks import refill_store
    from cds_hooks.refills import plan_patient

    timers = _Timers()

    class _TimedOrjson:
        JSONDecodeError = orjson.JSONDecodeError
        dumps = staticmethod(orjson.dumps)
        loads = staticmethod(timers.wrap("orjson.loads (FHIR answers)", orjson.loads))

    scanner = refill_scan.RefillScanner
    patches: list[tuple[Any, str, Any]] = [
        (fhir_client, "orjson", _TimedOrjson),
        (refill_scan, "plan_patient", timers.wrap("plan_patient (chart, rules, test plan)", plan_patient)),
        (scanner, "_apply", timers.wrap("_apply (judge + store, in threads)", scanner._apply)),
        (scanner, "fetch_charts", timers.wrap_async("fetch_charts (await batch searches)", scanner.fetch_charts)),
    ]
    for name in ("store_draft", "withdraw_superseded", "withdraw_unseen", "record_check_error"):
        patches.append((refill_store, name, timers.wrap(f"refill_store.{name} (SQLite)", getattr(refill_store, name))))
    for target, name, value in patches:
        setattr(target, name, value)
    return timers


def child(kind: str, base: str, db_path: str, traced: bool, breakdown: bool) -> dict[str, Any]:
    import httpx

    from cds_hooks.db import make_engine, migrate
    from cds_hooks.fhir_client import FhirClient
    from cds_hooks.refill_scan import RefillScanner
    from rems.config import default_config

    timers = _instrument() if breakdown else None
    engine = make_engine(f"sqlite:///{db_path}")
    migrate(engine)
    config = default_config()
    cls = _bare_paging_class() if kind == "bare" else RefillScanner
    urls: list[str] = []

    async def count(request: httpx.Request) -> None:
        urls.append(str(request.url))

    async def run() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # the service's (cds_hooks.app)
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(FHIR_TIMEOUT_S), limits=limits, event_hooks={"request": [count]}
        ) as http:
            scanner = cls(engine, FhirClient(base, http, None), zone=ZoneInfo(ZONE), config=config)
            rss_before = _rss_now_mb()
            peak_before = _rss_peak_mb()
            if traced:
                import tracemalloc

                tracemalloc.start()
            started = time.perf_counter()
            report = await scanner.scan(NOW)
            seconds = time.perf_counter() - started
            traced_peak = 0.0
            if traced:
                import tracemalloc

                traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            return {
                "seconds": seconds,
                "report": report.as_json(),
                "rss_before_mb": rss_before,
                "peak_before_mb": peak_before,
                "peak_mb": _rss_peak_mb(),
                "traced_peak_mb": traced_peak,
            }

    out = asyncio.run(run())
    engine.dispose()
    out["requests"] = len(urls)
    out["urls_digest"] = hashlib.sha256("\n".join(sorted(urls)).encode()).hexdigest()[:16]
    if timers is not None:
        out["breakdown"] = timers.as_json()
    return out


# --- the parent: populations, engines, runs, table ------------------------------------------------


def _run_child(kind: str, base: str, db_path: Path, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tests.bench_refill_scan", "--child", kind, "--base", base, "--db", str(db_path)]
    proc = subprocess.run(
        [*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _engine_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _delta(r: dict[str, Any]) -> float:
    return float(r["peak_mb"]) - float(r["rss_before_mb"])


def measure(
    patients: int, seed: int, runs: int, traced: bool, breakdown: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    from sandbox.fhir_engine import start_fhir_server
    from sandbox.seed import generate, write

    with tempfile.TemporaryDirectory(prefix="bench-refill-scan-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        files = write(tmp / "seed", generate(patients, seed, TODAY, ZONE))
        generated = time.perf_counter() - started
        log(
            f"  {patients} patients: {len(files)} Bundle files written in {generated:.1f} s; "
            "loading them into a fresh engine"
        )
        started = time.perf_counter()
        with start_fhir_server(load=[tmp / "seed"], timeout=LOAD_TIMEOUT_S) as server:
            load_s = time.perf_counter() - started
            engine_mb = _engine_rss_mb(server.process.pid)
            log(f"  {patients} patients: loaded in {load_s:.1f} s (engine RSS {engine_mb:.0f} MB); warm-up pass")
            _run_child("bare", server.base, tmp / "warmup.sqlite")
            scans: list[dict[str, Any]] = []
            bares: list[dict[str, Any]] = []
            for i in range(runs):
                bares.append(_run_child("bare", server.base, tmp / f"bare{i}.sqlite"))
                scans.append(_run_child("scan", server.base, tmp / f"scan{i}.sqlite"))
                log(
                    f"  {patients} patients: run {i + 1}: scan {scans[-1]['seconds']:.1f} s, "
                    f"bare {bares[-1]['seconds']:.1f} s"
                )
            traced_run = _run_child("scan", server.base, tmp / "traced.sqlite", "--tracemalloc") if traced else None
            broken = _run_child("scan", server.base, tmp / "breakdown.sqlite", "--breakdown") if breakdown else None
            engine_after_mb = _engine_rss_mb(server.process.pid)
    return {
        "patients": patients,
        "load_s": load_s,
        "engine_mb": engine_mb,
        "engine_after_mb": engine_after_mb,
        "scans": scans,
        "bares": bares,
        "traced": traced_run,
        "breakdown": broken,
    }


def _fmt_ratio(value: float, target: float) -> str:
    return f"{value:.2f}× {'PASS' if value <= target else 'MISS'}"


def report(results: list[dict[str, Any]], runs: int, out: Any) -> dict[str, Any]:
    out.write(
        f"\nrefill scan vs bare paging: seeded patients (seed as given), each population loaded into a fresh "
        f"FHIR engine;\nfile SQLite store in a temp dir, no auth (FhirClient auth=None straight on the engine), "
        f"default ScanOptions;\nbest of {runs} warm runs (median in brackets); {os.cpu_count()} cores shared by "
        f"the Node engine and the scanning Python\n"
    )
    out.write(
        f"  {'patients':>8} {'load s':>7} {'scan s':>14} {'pat/s':>6} {'drafts':>6} {'bare s':>14} {'scan/bare':>14}"
        f" {'reqs':>5} {'RSS Δ MB':>8} {'traced MB':>9}\n"
    )
    summary: dict[str, Any] = {}
    for r in results:
        scan_s = [float(s["seconds"]) for s in r["scans"]]
        bare_s = [float(b["seconds"]) for b in r["bares"]]
        best_scan, best_bare = min(scan_s), min(bare_s)
        first = r["scans"][0]
        patients_seen = int(first["report"]["patients"])
        created = {int(s["report"]["created"]) for s in r["scans"]}
        rss = max(_delta(s) for s in r["scans"])
        traced = float(r["traced"]["traced_peak_mb"]) if r["traced"] else float("nan")
        ratio = best_scan / best_bare
        out.write(
            f"  {r['patients']:>8} {r['load_s']:>7.1f} {best_scan:>6.1f} ({statistics.median(scan_s):>5.1f})"
            f" {patients_seen / best_scan:>6.0f} {'/'.join(map(str, sorted(created))):>6}"
            f" {best_bare:>6.1f} ({statistics.median(bare_s):>5.1f}) {_fmt_ratio(ratio, SPEED_TARGET):>14}"
            f" {int(first['requests']):>5} {rss:>8.0f} {traced:>9.1f}\n"
        )
        everything = [*r["scans"], *r["bares"]]
        failed = [int(s["report"]["failed"]) for s in everything]
        reasons = sorted({f["reason"] for s in everything for f in s["report"]["failures"]})
        digests = {s["urls_digest"] for s in everything}
        counts = sorted({int(s["requests"]) for s in everything})
        if any(failed) or len(digests) > 1:
            out.write(
                f"    WARNING {r['patients']}: patients failed per run (scans, then bare) {failed}: "
                f"{'; '.join(reasons[:3]) or '-'}; request URLs of scan and bare "
                f"{'differ' if len(digests) > 1 else 'identical'} (counts {counts}; a failed batch skips some)\n"
            )
        summary[str(r["patients"])] = {
            "load_s": r["load_s"],
            "scan_s": scan_s,
            "bare_s": bare_s,
            "ratio": ratio,
            "patients": patients_seen,
            "created": sorted(created),
            "requests": first["requests"],
            "rss_before_mb": first["rss_before_mb"],
            "rss_delta_mb": rss,
            "traced_peak_mb": traced,
            "failed": failed,
            "engine_mb": [r["engine_mb"], r["engine_after_mb"]],
        }
    out.write(
        "  load s: generate+write excluded; the engine reading the Bundles at start (validating each resource).\n"
        "  RSS Δ: the scanning child's peak RSS (ru_maxrss) minus its RSS just before the scan (worst run);\n"
        "  traced MB: tracemalloc peak of the Python allocations during one more (untimed) scan.\n"
        "  bare s: the scan's own requests (RefillScanner with _apply and _withdraw_unseen doing nothing),\n"
        "  parsed and dropped. The engine's RSS after loading: "
        + ", ".join(f"{r['patients']}: {r['engine_mb']:.0f} MB" for r in results)
        + "\n"
    )
    for r in results:
        scan_s = [float(s["seconds"]) for s in r["scans"]]
        ratio = min(scan_s) / min(float(b["seconds"]) for b in r["bares"])
        out.write(
            f"  target scan ≤ {SPEED_TARGET}× bare paging, {r['patients']} patients: "
            f"{_fmt_ratio(ratio, SPEED_TARGET)}\n"
        )
    if len(results) > 1:
        small, large = results[0], results[-1]
        rss_ratio = max(_delta(s) for s in large["scans"]) / max(1e-9, max(_delta(s) for s in small["scans"]))
        line = (
            f"  target flat memory, {large['patients']} vs {small['patients']} ≤ {MEMORY_TARGET}×: "
            f"RSS Δ {_fmt_ratio(rss_ratio, MEMORY_TARGET)}"
        )
        summary["memory_ratio_rss"] = rss_ratio
        if small["traced"] and large["traced"]:
            t_ratio = float(large["traced"]["traced_peak_mb"]) / max(1e-9, float(small["traced"]["traced_peak_mb"]))
            line += f"; tracemalloc {_fmt_ratio(t_ratio, MEMORY_TARGET)}"
            summary["memory_ratio_traced"] = t_ratio
        out.write(line + "\n")
    for r in results:
        if r["breakdown"]:
            b = r["breakdown"]
            out.write(
                f"  where a {r['patients']}-patient scan's time goes (one extra run, timers on: "
                f"{b['seconds']:.1f} s wall; sums over threads):\n"
            )
            for name, v in sorted(b["breakdown"].items(), key=lambda kv: -kv[1]["wall"]):
                cpu = f"{v['cpu']:>7.1f} s CPU" if v["cpu"] else " " * 13
                out.write(f"    {name:<48} {v['wall']:>7.1f} s wall {cpu} {v['calls']:>7} calls\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_refill_scan")
    parser.add_argument("--patients", default="1000,10000", help="population sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=2, help="warm runs of each of scan and bare paging (best shown)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc run")
    parser.add_argument("--breakdown", action="store_true", help="one more scan with timers: where the time goes")
    parser.add_argument("--child", choices=("scan", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = sys.stdout
    if args.child:
        result = child(args.child, args.base, args.db, args.tracemalloc, args.breakdown)
        out.write(json.dumps(result) + "\n")
        return 0

    sizes = [int(s) for s in args.patients.split(",") if s.strip()]
    runs = max(1, args.runs)

    def log(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    log(f"refill scan bench: {sizes} patients, seed {args.seed}, {runs} runs each")
    results = [measure(n, args.seed, runs, not args.no_tracemalloc, args.breakdown, log) for n in sizes]
    summary = report(results, runs, out)
    out.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
