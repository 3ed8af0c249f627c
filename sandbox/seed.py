"""The sandbox EHR's synthetic IMiD population: FHIR R4 Bundles of PUTs, a manifest, and loading.

    bundles = generate(1000, seed=7, today=date(2026, 11, 21))   # an iterator: one Bundle per 50 patients
    load("http://127.0.0.1:8080/fhir/R4", bundles)                # or write(Path("out"), bundles)
    manifest = plan(1000, seed=7, today=date(2026, 11, 21))       # what was planned, patient by patient

or from the command line (wired as ``imid-rems sandbox seed``)::

    imid-rems sandbox seed --patients 1000 --seed 7 [--today 2026-11-21] [--tz America/New_York] \\
        (--out DIR | --fhir URL [--token T]) [--manifest FILE] [--bundle-type batch|transaction]

- **Deterministic**: the same (patients, seed, today, zone) give the same bytes; patient `i` is the same
  whatever the population size. Every entry is ``PUT Type/id`` with a fixed id (``sb-p000123``,
  ``sb-p000123-rx04``...), so loading twice never duplicates anything.
- **Realistic** (`sandbox.seed_plan` says how): the six REMS risk categories in clinic proportions (men and
  post-menopausal women on myeloma therapy dominate; children are rare), lenalidomide / pomalidomide /
  thalidomide for their main indications, months of monthly orders and 28-day fills, pregnancy tests on
  the REMS schedule, CBCs, creatinine and weights, thromboprophylaxis, infusion appointments, and a
  controlled share of charts with a problem the product must find (`PROBLEMS`).
- **Streaming**: one Bundle of `BLOCK` patients at a time; the clinic's practitioners are in the first.
- **Batch by default**: a 50-patient chunk is some 3,700 PUTs, and Medplum's engine (the sandbox's FHIR
  server) refuses a *transaction* of more than 50 updates; ``bundle_type="transaction"`` is there for
  servers that take them. The PUTs are idempotent, so a batch that fails part-way is loaded again.

The manifest's `PatientPlan.expected_rules` are the rule codes an order-sign of a renewal of each
patient's active order, signed today by its prescriber, must raise.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import orjson

from sandbox.seed_fhir import Clock, patient_resources, staff_resources
from sandbox.seed_plan import BLOCK, CLEAN, PROBLEMS, STAFF, PatientPlan, plan, plan_block

__all__ = [
    "BLOCK",
    "CLEAN",
    "PROBLEMS",
    "STAFF",
    "PatientPlan",
    "SeedLoadError",
    "generate",
    "load",
    "main",
    "plan",
    "write",
]

Json = dict[str, Any]
BundleType = Literal["batch", "transaction"]
FHIR_JSON = "application/fhir+json"
LOAD_TIMEOUT_S = 300.0
"""Per Bundle: a 50-patient transaction is a few thousand resources, validated by the server."""
BUNDLE_FILE = re.compile(r"^\d{4,}\.json$")


def _entry(resource: Json) -> Json:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


def _bundle(resources: Iterable[Json], bundle_type: BundleType) -> Json:
    return {"resourceType": "Bundle", "type": bundle_type, "entry": [_entry(r) for r in resources]}


def generate(
    patients: int,
    seed: int,
    today: date,
    zone: str = "America/New_York",
    *,
    bundle_type: BundleType = "batch",
) -> Iterator[Json]:
    """Bundles of `BLOCK` patients each (the last may hold fewer), the clinic's organizations, infusion
    center, practitioners and roles first. Nothing is dated `today` or later except booked appointments;
    clinic times are in `zone`.

    `bundle_type` ``batch`` (the default) loads anywhere; ``transaction`` only where a server accepts
    thousands of updates in one transaction: Medplum's engine (the sandbox's) refuses more than 50, so a
    50-patient transaction can neither be POSTed to it nor read by its ``--load``. Every entry is an
    idempotent ``PUT``, so a batch that fails part-way is simply loaded again."""
    if patients < 0:
        raise ValueError(f"patients must be 0 or more, got {patients}")
    if bundle_type not in ("batch", "transaction"):
        raise ValueError(f"bundle_type must be 'batch' or 'transaction', got {bundle_type!r}")
    clock = Clock(zone)
    blocks = (patients + BLOCK - 1) // BLOCK
    if blocks == 0:
        yield _bundle(staff_resources(), bundle_type)
        return
    for block in range(blocks):
        resources: list[Json] = staff_resources() if block == 0 else []
        for p in plan_block(seed, block, today, min(BLOCK, patients - block * BLOCK)):
            resources.extend(patient_resources(p, seed, clock))
        yield _bundle(resources, bundle_type)


def write(out_dir: Path, bundles: Iterable[Json]) -> list[Path]:
    """Write each Bundle to ``out_dir/NNNN.json`` (the FHIR engine's ``--load DIR`` reads them in name
    order). Bundle files of an earlier, larger run (``NNNN.json`` beyond these) are removed, so the
    directory always holds exactly this population; other files are left alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, bundle in enumerate(bundles):
        path = out_dir / f"{i:04d}.json"
        path.write_bytes(orjson.dumps(bundle))
        written.append(path)
    keep = {p.name for p in written}
    for stale in out_dir.iterdir():
        if BUNDLE_FILE.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return written


class SeedLoadError(RuntimeError):
    """A Bundle could not be loaded: the message names the Bundle (its number and first patient) and
    the entry (its index and ``Type/id``) with the server's answer."""


def _outcome_text(body: Any) -> str:
    """The server's OperationOutcome, shortly: ``<diagnostics or details> at <expression>``."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
        where = ", ".join(issue.get("expression") or issue.get("location") or [])
        parts.append(f"{text} at {where}" if where else str(text))
    return "; ".join(parts)[:500]


def _bundle_name(number: int, bundle: Json) -> str:
    first = next(
        (e["request"]["url"] for e in bundle.get("entry", []) if e["request"]["url"].startswith("Patient/")),
        None,
    )
    return f"Bundle {number:04d}" + (f" (from {first})" if first else "")


def _failed_entries(bundle: Json, result: Json) -> list[str]:
    out = []
    responses = result.get("entry") or []
    for i, entry in enumerate(bundle["entry"]):
        response = (responses[i] if i < len(responses) else {}).get("response") or {}
        status = str(response.get("status", ""))
        if not status.startswith("2"):
            outcome = _outcome_text(response.get("outcome"))
            out.append(f"entry {i} ({entry['request']['url']}): {status or 'no status'} {outcome}".rstrip())
    return out


def _post(client: httpx.Client, base: str, number: int, bundle: Json) -> int:
    """POST one transaction; on failure, find the failing entries and raise `SeedLoadError`. Returns the
    number of resources written."""
    name = _bundle_name(number, bundle)
    body = orjson.dumps(bundle)
    try:
        response = client.post(base, content=body)
    except httpx.HTTPError as exc:
        raise SeedLoadError(f"{name}: POST to {base} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 200:
        result = response.json()
        failed = _failed_entries(bundle, result)
        if failed:
            raise SeedLoadError(f"{name}: {len(failed)} entries failed: " + "; ".join(failed[:5]))
        return len(bundle["entry"])
    try:
        outcome = _outcome_text(response.json())
    except ValueError:
        outcome = response.text[:300]
    if response.status_code in (401, 403) or bundle.get("type") != "transaction":
        raise SeedLoadError(f"{name}: the server answered {response.status_code}: {outcome}")
    # The transaction was rolled back and its OperationOutcome may not say which entry failed: ask
    # again as a batch, which answers entry by entry. (The good entries are written by it: the same
    # PUTs a successful load makes, so loading again after the fix is still idempotent.)
    detail = ""
    try:
        retry = client.post(base, content=orjson.dumps({**bundle, "type": "batch"}))
        if retry.status_code == 200:
            detail = "; ".join(_failed_entries(bundle, retry.json())[:5])
    except (httpx.HTTPError, ValueError):
        pass
    raise SeedLoadError(
        f"{name}: the transaction failed with {response.status_code} ({outcome})" + (f"; {detail}" if detail else "")
    )


def load(base_url: str, bundles: Iterable[Json], token: str | None = None, concurrency: int = 4) -> int:
    """POST each transaction Bundle to the FHIR base `base_url` (the first alone, so the practitioners
    exist before the patients that refer to them; then up to `concurrency` at a time, holding no more
    Bundles than that in memory). Returns the number of resources written; raises `SeedLoadError` naming
    the Bundle and the entry that failed (the Bundles before it, and those in flight, are written)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be 1 or more, got {concurrency}")
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    base = base_url.rstrip("/")
    written = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with (
        httpx.Client(headers=headers, timeout=LOAD_TIMEOUT_S, limits=limits) as client,
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="seed-load") as pool,
    ):
        pending: set[Future[int]] = set()
        try:
            for number, bundle in enumerate(bundles):
                if number == 0:
                    written += _post(client, base, 0, bundle)
                    continue
                if len(pending) >= concurrency:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    written += sum(f.result() for f in done)
                pending.add(pool.submit(_post, client, base, number, bundle))
            for future in pending:
                written += future.result()
        finally:
            for future in pending:
                future.cancel()
    return written


# --------------------------------------------------------------------------------------------------
# imid-rems sandbox seed
# --------------------------------------------------------------------------------------------------


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown IANA time zone {text!r}") from None
    return text


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imid-rems sandbox seed",
        description=(
            "Generate the sandbox's synthetic IMiD patients as FHIR R4 transaction Bundles "
            f"({BLOCK} patients each) into a directory or onto a FHIR server. Deterministic: the same "
            "arguments give the same bytes; loading twice duplicates nothing (PUT Type/id)."
        ),
    )
    parser.add_argument("--patients", type=_count, required=True, help="how many patients")
    parser.add_argument("--seed", type=int, required=True, help="random seed (any integer)")
    parser.add_argument("--today", type=_day, help="the day the data leads up to (default: today in --tz)")
    parser.add_argument("--tz", type=_zone, default="America/New_York", help="the clinic's IANA time zone")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write NNNN.json Bundles into this directory")
    target.add_argument("--fhir", metavar="URL", help="POST the Bundles to this FHIR base URL")
    parser.add_argument("--token", help="bearer token for --fhir")
    parser.add_argument("--concurrency", type=_count, default=4, help="Bundles posted at once (--fhir)")
    parser.add_argument("--manifest", type=Path, help="also write the manifest (one JSON line per patient)")
    parser.add_argument(
        "--bundle-type",
        choices=("batch", "transaction"),
        default="batch",
        help="Bundle.type (default batch: Medplum's engine takes at most 50 updates in a transaction)",
    )
    return parser


def write_manifest(path: Path, plans: Iterable[PatientPlan]) -> None:
    """One JSON object per line: `PatientPlan.manifest()`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for p in plans:
            handle.write(orjson.dumps(p.manifest()) + b"\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.token is not None and args.fhir is None:
        sys.stderr.write("imid-rems sandbox seed: --token goes with --fhir\n")
        return 2
    if args.concurrency < 1:
        sys.stderr.write("imid-rems sandbox seed: --concurrency must be 1 or more\n")
        return 2
    today: date = args.today or datetime.now(ZoneInfo(args.tz)).date()
    started = time.perf_counter()
    counted = 0

    def counting(bundles: Iterator[Json]) -> Iterator[Json]:
        nonlocal counted
        for bundle in bundles:
            counted += len(bundle["entry"])
            yield bundle

    bundles = counting(generate(args.patients, args.seed, today, args.tz, bundle_type=args.bundle_type))
    try:
        if args.out is not None:
            files = write(args.out, bundles)
            where = f"{len(files)} files in {args.out}"
        else:
            counted = load(args.fhir, bundles, token=args.token, concurrency=args.concurrency)
            where = f"loaded into {args.fhir}"
    except (SeedLoadError, OSError) as exc:
        sys.stderr.write(f"imid-rems sandbox seed: {exc}\n")
        return 1
    if args.manifest is not None:
        write_manifest(args.manifest, plan(args.patients, args.seed, today))
    seconds = time.perf_counter() - started
    sys.stdout.write(
        f"seeded {args.patients} patients, {counted} resources ({where}; seed {args.seed}, "
        f"today {today.isoformat()}, {args.tz}) in {seconds:.1f} s\n"
    )
    return 0
