"""The refill scan: every patient with an active IMiD order on the FHIR server, their days left, and a drafted
next prescription (with its pre-checks) for each one due inside the drafting horizon.

How it reads the server (SMART Backend Services token, `cds_hooks.fhir_client`):

1. ``MedicationRequest?status=active`` page by page (``page_size``): the orders that are, or may be, IMiDs
   (by RxNorm code or name; a ``medicationReference`` counts as "may be" until the chart resolves it) give
   the patients to look at. Only their ids are kept (to skip a patient already seen on an earlier page).
2. Patients are grouped in batches of ``batch_size``. For each batch, the chart the CDS services read
   (`cds_hooks.services.chart_templates`: orders, dispenses, the observations the rules read, conditions,
   procedures) plus the Patients and their Appointments are fetched **in parallel**, one search per kind
   for the whole batch (``patient=id1,id2,...``), then split by patient. Medications the orders point to
   are read too.
3. Each patient's chart is judged (`cds_hooks.refills.plan_patient`) and the drafts stored
   (`cds_hooks.refill_store.upsert_draft`), off the event loop, while the next batches are fetched.

At most ``concurrency`` batches are in flight and the next page of orders is not read before a batch slot
is free, so memory holds a bounded number of charts whatever the population (flat from 1k to 10k).

Faults: a batch whose fetch fails (server down, slow, 5xx, garbage) leaves every draft of its patients as
it was and records the error on their pending drafts (``last_error``, audit ``check-failed``); a patient
whose chart cannot be read is reported with the field that failed (and recorded on their pending drafts).
The scan goes on with the other batches; the report counts what failed. If the order listing itself fails
the scan stops (``ScanReport.error``) and withdraws nothing.

After a complete scan, pending drafts whose order is no longer the patient's current active order (a
prescriber renewed or stopped it) are withdrawn: rejected by ``system:scan`` with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Engine

from cds_hooks import refill_store as store
from cds_hooks.fhir_client import FhirClient, FhirError
from cds_hooks.refills import PatientChart, describe_failure, plan_patient
from cds_hooks.services import chart_templates
from fhir_mappings.codes import default_codes
from rems.config import Config
from rems.timing import local_day

log = logging.getLogger("imid_rems.refill_scan")

Json = dict[str, Any]

CHART_KEYS = ("medications", "dispenses", "observations", "conditions", "procedures")
_SUBJECT = {
    "MedicationRequest": "subject",
    "MedicationDispense": "subject",
    "Observation": "subject",
    "Condition": "subject",
    "Procedure": "subject",
}
APPOINTMENT_LOOKBACK_DAYS = 1
"""Appointments are fetched from yesterday on (an infusion today, in any zone, is still ahead)."""


@dataclass
class ScanReport:
    started: datetime
    seconds: float = 0.0
    """Wall time the scan took (monotonic clock)."""
    pages: int = 0
    active_orders: int = 0
    """Active MedicationRequests that are (or may be) IMiDs."""
    patients: int = 0
    created: int = 0
    rechecked: int = 0
    """Pending drafts whose content or checks changed."""
    unchanged: int = 0
    not_due: int = 0
    """Active IMiD orders with more days left than the horizon (or already the next fill)."""
    withdrawn: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(patient id, reason) of charts that could not be fetched or read."""
    error: str | None = None
    """Why the scan stopped early (the order listing failed); None when it ran to the end."""

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started.isoformat(),
            "seconds": round(self.seconds, 3),
            "pages": self.pages,
            "activeOrders": self.active_orders,
            "patients": self.patients,
            "created": self.created,
            "rechecked": self.rechecked,
            "unchanged": self.unchanged,
            "notDue": self.not_due,
            "withdrawn": self.withdrawn,
            "failed": len(self.failures),
            "failures": [{"patient": p, "reason": r} for p, r in self.failures[:200]],
            "error": self.error,
        }


@dataclass(frozen=True)
class ScanOptions:
    horizon_days: int = 10
    page_size: int = 500
    batch_size: int = 50
    concurrency: int = 4


def _patient_id(reference: Any) -> str | None:
    if not isinstance(reference, str):
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def _subject_of(resource: Json) -> str | None:
    name = _SUBJECT.get(resource.get("resourceType", ""))
    if name is None:
        return None
    value = resource.get(name)
    return _patient_id(value.get("reference")) if isinstance(value, dict) else None


def _appointment_patients(resource: Json) -> set[str]:
    out: set[str] = set()
    for p in resource.get("participant") or []:
        if isinstance(p, dict) and isinstance(p.get("actor"), dict):
            pid = _patient_id(p["actor"].get("reference"))
            if pid:
                out.add(pid)
    return out


def may_be_imid(mr: Json, words: tuple[str, ...], codes: frozenset[str]) -> bool:
    """Cheap test on a raw active order: could it be an IMiD? (The chart's parse decides for sure.)"""
    if "medicationReference" in mr:
        return True
    mcc = mr.get("medicationCodeableConcept")
    if not isinstance(mcc, dict):
        return False
    text = str(mcc.get("text", "")).lower()
    for c in mcc.get("coding") or []:
        if isinstance(c, dict):
            if str(c.get("code", "")) in codes:
                return True
            text += " " + str(c.get("display", "")).lower()
    return any(w in text for w in words)


def _imid_terms() -> tuple[tuple[str, ...], frozenset[str]]:
    codes = default_codes()
    words = tuple(t for imid in codes.imids for t in imid.text)
    all_codes = frozenset(c for imid in codes.imids for c in (*imid.generic, *imid.brand))
    return words, all_codes


class RefillScanner:
    """One scan at a time per instance; several instances (replicas) may scan at once: the store's unique
    keys make their drafts the same rows."""

    def __init__(
        self,
        engine: Engine,
        fhir: FhirClient,
        *,
        zone: tzinfo,
        config: Config,
        options: ScanOptions | None = None,
    ) -> None:
        self.engine = engine
        self.fhir = fhir
        self.zone = zone
        self.config = config
        self.options = options or ScanOptions()
        self._templates = {k: v for k, v in chart_templates().items() if k in CHART_KEYS}
        self._lock = threading.Lock()

    async def scan(self, now: datetime) -> ScanReport:
        report = ScanReport(started=now)
        t0 = time.monotonic()
        opts = self.options
        words, codes = _imid_terms()
        seen: set[str] = set()
        batch: list[str] = []
        slots = asyncio.Semaphore(opts.concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def launch(ids: list[str]) -> None:
            await slots.acquire()
            task = asyncio.create_task(self._batch(ids, now, report))
            tasks.add(task)

            def done(t: asyncio.Task[None]) -> None:
                tasks.discard(t)
                slots.release()

            task.add_done_callback(done)

        try:
            async for page in self.fhir.pages(f"MedicationRequest?status=active&_count={opts.page_size}"):
                report.pages += 1
                for mr in page:
                    if mr.get("resourceType") != "MedicationRequest" or not may_be_imid(mr, words, codes):
                        continue
                    report.active_orders += 1
                    pid = _subject_of(mr)
                    if pid is None or pid in seen:
                        continue
                    seen.add(pid)
                    batch.append(pid)
                    if len(batch) >= opts.batch_size:
                        await launch(batch)
                        batch = []
            if batch:
                await launch(batch)
        except FhirError as exc:
            report.error = f"listing active orders: {exc}"
        finally:
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        report.patients = len(seen)
        if report.error is None:
            report.withdrawn += await asyncio.to_thread(self._withdraw_unseen, seen, now)
        report.seconds = time.monotonic() - t0
        log.info(
            "refill scan: %d patients, %d created, %d rechecked, %d withdrawn, %d failed%s",
            report.patients,
            report.created,
            report.rechecked,
            report.withdrawn,
            len(report.failures),
            f"; stopped: {report.error}" if report.error else "",
        )
        return report

    async def fetch_charts(self, ids: list[str], now: datetime) -> dict[str, PatientChart]:
        """The charts of `ids` (one search per kind for all of them, in parallel). Raises `FhirError`."""
        joined = ",".join(ids)
        queries = {
            key: tpl.replace("{{context.patientId}}", joined) + "&_count=1000" for key, tpl in self._templates.items()
        }
        since = local_day(now, self.zone) - timedelta(days=APPOINTMENT_LOOKBACK_DAYS)
        queries["appointments"] = f"Appointment?patient={joined}&date=ge{since.isoformat()}&_count=1000"
        queries["patients"] = f"Patient?_id={joined}&_count={max(len(ids), 1)}"
        keys = list(queries)
        results = await asyncio.gather(*(self.fhir.search(queries[k]) for k in keys))
        found = dict(zip(keys, results, strict=True))
        medications = await self._referenced_medications(found)
        charts: dict[str, dict[str, list[Json]]] = defaultdict(lambda: defaultdict(list))
        patients: dict[str, Json] = {}
        for r in found["patients"]:
            if r.get("resourceType") == "Patient" and isinstance(r.get("id"), str):
                patients[r["id"]] = r
        wanted = set(ids)
        for key in CHART_KEYS:
            for r in found[key]:
                pid = _subject_of(r)
                if pid in wanted:
                    charts[pid][key].append(r)
        for r in found["appointments"]:
            for pid in _appointment_patients(r) & wanted:
                charts[pid]["appointments"].append(r)
        out: dict[str, PatientChart] = {}
        for pid in ids:
            patient = patients.get(pid)
            if patient is None:
                continue
            chart = charts.get(pid, {})
            prefetch: dict[str, Any] = {key: _searchset(chart.get(key, ())) for key in CHART_KEYS}
            if medications:
                prefetch["referenced"] = _searchset(medications)
            out[pid] = PatientChart(patient, prefetch, tuple(chart.get("appointments", ())))
        return out

    async def _referenced_medications(self, found: dict[str, list[Json]]) -> list[Json]:
        ids: set[str] = set()
        for key in ("medications", "dispenses"):
            for r in found[key]:
                ref = r.get("medicationReference")
                target = ref.get("reference") if isinstance(ref, dict) else None
                if isinstance(target, str) and not target.startswith("#"):
                    parts = target.rstrip("/").split("/")
                    if len(parts) >= 2 and parts[-2] == "Medication":
                        ids.add(parts[-1])
        if not ids:
            return []
        return await self.fhir.search(f"Medication?_id={','.join(sorted(ids))}&_count={len(ids)}")

    async def _batch(self, ids: list[str], now: datetime, report: ScanReport) -> None:
        try:
            await self._batch_inner(ids, now, report)
        except Exception as exc:  # anything unexpected: the batch's patients are reported, never dropped
            log.warning("refill scan: a batch failed (%s)", type(exc).__name__)
            with self._lock:
                report.failures.extend((pid, f"scan failed ({type(exc).__name__})") for pid in ids)

    async def _batch_inner(self, ids: list[str], now: datetime, report: ScanReport) -> None:
        try:
            charts = await self.fetch_charts(ids, now)
        except FhirError as exc:
            reason = f"chart fetch failed: {exc}"
            with self._lock:
                report.failures.extend((pid, reason) for pid in ids)
            await asyncio.to_thread(self._record_errors, ids, reason, now)
            return
        missing = [pid for pid in ids if pid not in charts]
        with self._lock:
            report.failures.extend((pid, "the Patient is not on the FHIR server") for pid in missing)
        await asyncio.to_thread(self._apply, charts, now, report)

    def _apply(self, charts: dict[str, PatientChart], now: datetime, report: ScanReport) -> None:
        """Judge and store one batch (in a worker thread). Counts are tallied locally and added to `report`
        under a lock: batches run in parallel threads."""
        opts = self.options
        tally = ScanReport(started=now)
        for pid, chart in charts.items():
            try:
                plan = plan_patient(chart, now=now, zone=self.zone, config=self.config, horizon_days=opts.horizon_days)
            except Exception as exc:  # one unreadable chart must not stop the scan
                reason = f"chart could not be read: {describe_failure(exc)}"
                tally.failures.append((pid, reason))
                self._quietly(store.record_check_error, self.engine, pid, reason, now=now)
                continue
            for skipped in plan.skipped:
                if skipped.days_left is None:  # a safety check that could not read its data says so
                    tally.failures.append((pid, f"{skipped.order}: {skipped.reason}"))
                else:
                    tally.not_due += 1
            try:
                for planned in plan.planned:
                    _, outcome = store.store_draft(self.engine, planned.draft, planned.checks, now=now)
                    if outcome == "created":
                        tally.created += 1
                    elif outcome == "changed":
                        tally.rechecked += 1
                    else:
                        tally.unchanged += 1
                tally.withdrawn += store.withdraw_superseded(
                    self.engine, pid, current=plan.current_orders, now=now, reason="is no longer the active order"
                )
            except Exception as exc:  # a database fault on one patient: report it, go on with the others
                log.warning("refill scan: storing a draft failed (%s)", type(exc).__name__)
                tally.failures.append((pid, f"the draft could not be stored ({type(exc).__name__})"))
        with self._lock:
            report.created += tally.created
            report.rechecked += tally.rechecked
            report.unchanged += tally.unchanged
            report.not_due += tally.not_due
            report.withdrawn += tally.withdrawn
            report.failures.extend(tally.failures)

    @staticmethod
    def _quietly(fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # recording an error must not hide the error itself
            log.warning("refill scan: recording a check error failed (%s)", type(exc).__name__)

    def _record_errors(self, ids: Iterable[str], reason: str, now: datetime) -> None:
        for pid in ids:
            self._quietly(store.record_check_error, self.engine, pid, reason, now=now)

    def _withdraw_unseen(self, seen: set[str], now: datetime) -> int:
        return store.withdraw_unseen(self.engine, seen, now=now, reason="the patient has no active IMiD order")


def _searchset(resources: Iterable[Json]) -> Json:
    entries = [{"resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}
