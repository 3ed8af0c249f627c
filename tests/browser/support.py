"""What the browser tests share: the whole `make run` stack in one process (`start_ehr`, the `Ehr` handle the
``ehr`` fixture yields), screenshots (`shot`) and where test artifacts go.

The stack is assembled as ``imid-rems sandbox run`` assembles it (`sandbox.run`), except that the imid-rems
service runs in a thread of this process (`tests.support.cds_server.run_cds_server`) so tests can move its
clock: the FHIR engine with `PATIENTS` seeded patients and the whole scenario corpus, the imid-rems service
(JWT checks on, trusting the sandbox through its JWKS URL; the sandbox's gateway as its EHR through the
``imid-rems-backend`` Backend Services client; SMART app launched from the sandbox) and the sandbox EHR
(`sandbox.app.create_sandbox_app` with `default_config`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import FastAPI
from playwright.sync_api import Page

from cds_hooks.app import create_app
from cds_hooks.settings import Settings
from sandbox import seed
from sandbox.app import BACKEND_CLIENT_ID, BACKEND_KEY_FILE, backend_key, create_sandbox_app, default_config
from sandbox.corpus import CorpusScenario, load_corpus
from sandbox.fhir_engine import start_fhir_server
from sandbox.seed_plan import PatientPlan
from sandbox.smart_auth import SmartAuthServer
from tests.support.cds_server import CdsServer, Clock, free_port, serve_app

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
FAILURES = ARTIFACTS / "browser"

CLINIC_TZ = "America/New_York"
PATIENTS = 50
"""Seeded patients: a full first block, so every problem of `sandbox.seed_plan.PROBLEMS` and every risk
category is in the chart of some patient (12 patients of seed 1 hold no female who can get pregnant)."""
SEED = 1
APP_CLIENT_ID = "imid-rems-app"


def safe_name(name: str) -> str:
    """`name` as a file name: letters, digits, ``.``, ``_`` and ``-`` (a parametrized test's ``[id]`` too)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed"


def shot(page: Page, name: str) -> Path:
    """A full-page PNG of `page` at ``test-artifacts/screenshots/<name>.png``; returns its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{safe_name(name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@dataclass
class Ehr:
    """The running stack.

    - ``sandbox_base``: the sandbox EHR (launcher at ``/``, charts at ``/ehr/patients/{id}``, FHIR gateway at
      ``/fhir``, SMART authorization server at ``/auth``);
    - ``service_base``: the imid-rems service (``/cds-services``, the SMART app at ``/smart/launch``);
    - ``fhir_base``: the FHIR engine itself, no token needed: to assert what was written;
    - ``state_dir``: the sandbox's keys (``backend-client-key.pem`` the service signs with);
    - ``today``: the clinic's day the population was seeded for; ``plans``: the seeded patients' plans;
    - ``corpus``: every scenario of tests/scenarios by name (its charts are on the FHIR server);
    - ``cds``: the service (``cds.clock.now`` is its time; ``cds.app`` the FastAPI app); ``app``: the sandbox
      app (``app.state.auth`` is its `SmartAuthServer`).
    """

    sandbox_base: str
    service_base: str
    fhir_base: str
    state_dir: Path
    today: date
    plans: tuple[PatientPlan, ...]
    corpus: dict[str, CorpusScenario]
    cds: CdsServer
    app: FastAPI

    @property
    def auth(self) -> SmartAuthServer:
        auth: SmartAuthServer = self.app.state.auth
        return auth

    @property
    def clock(self) -> Clock:
        """The service's clock (the sandbox runs on real time, as `make run` does)."""
        return self.cds.clock

    def url(self, path: str = "/") -> str:
        """A sandbox URL: ``ehr.url("/ehr/patients/x")``."""
        return f"{self.sandbox_base}{path}"

    def chart_url(self, patient_id: str) -> str:
        """The patient's chart page (fires ``patient-view`` when opened)."""
        return self.url(f"/ehr/patients/{patient_id}")

    def set_now(self, when: datetime | None = None) -> None:
        """Move the service's clock to `when` (a corpus scenario's ``now``), or back to real time (None)."""
        self.cds.clock.now = when if when is not None else datetime.now(UTC)

    def scenario(self, name: str, *, set_clock: bool = True) -> CorpusScenario:
        """Corpus scenario `name` (its chart is on the server at ``patient_id``); by default the service's
        clock moves to the scenario's ``now`` so its findings are the expected ``codes``."""
        try:
            sc = self.corpus[name]
        except KeyError:
            raise KeyError(f"no corpus scenario {name!r}; there are: {', '.join(sorted(self.corpus))}") from None
        if set_clock:
            self.set_now(sc.now)
        return sc

    def seeded(
        self,
        *,
        category: str | None = None,
        problem: str | None = None,
        drug: str | None = None,
        sex: str | None = None,
        clean: bool | None = None,
        set_clock: bool = True,
    ) -> PatientPlan:
        """The first seeded patient that fits: `category` a REMS risk category (``adult-female-rp``,
        ``adult-male``...), `problem` a key of `sandbox.seed_plan.PROBLEMS` (``stale-test``...), `drug`
        (``lenalidomide``...), `sex`, `clean` (no problem put in the chart). Its ``patient_id`` is the chart's
        Patient id, ``expected_rules`` what an order-sign of a renewal today must raise. By default the
        service's clock moves back to real time (the population is seeded for today)."""
        for plan in self.plans:
            if category is not None and plan.category.value != category:
                continue
            if problem is not None and problem not in plan.problems:
                continue
            if drug is not None and plan.drug.value != drug:
                continue
            if sex is not None and plan.sex != sex:
                continue
            if clean is not None and plan.clean != clean:
                continue
            if set_clock:
                self.set_now(None)
            return plan
        asked = {"category": category, "problem": problem, "drug": drug, "sex": sex, "clean": clean}
        wanted = {k: v for k, v in asked.items() if v is not None}
        have = sorted({f"{p.category.value}/{p.drug.value}/{'+'.join(p.problems)}" for p in self.plans})
        raise LookupError(f"no seeded patient with {wanted}; seeded: {have}")

    def launch_url(self, *, user: str, patient: str | None, client_id: str = APP_CLIENT_ID, **context: Any) -> str:
        """An EHR launch of the SMART app (what the launcher's button does): the URL to open in the browser."""
        launch = self.auth.create_launch(client_id=client_id, user=user, patient=patient, **context)
        return self.auth.launch_url(launch)


def _service_settings(sandbox_base: str, service_base: str, state: Path) -> dict[str, Any]:
    """The service's settings of `sandbox.run.service_env`, as `Settings` fields."""
    settings: dict[str, Any] = {
        "database_url": f"sqlite:///{state / 'imid-rems.sqlite'}",
        "cds_auth": "on",
        "cds_clients": json.dumps([{"iss": sandbox_base, "jwks_url": f"{sandbox_base}/.well-known/jwks.json"}]),
        "clinic_tz": CLINIC_TZ,
        "public_base_url": service_base,
        "fhir_base_url": f"{sandbox_base}/fhir",
        "backend_client_id": BACKEND_CLIENT_ID,
        "backend_key_file": state / BACKEND_KEY_FILE,
        "refill_scan_interval_s": 0,  # no background scan: tests run it when they mean to
        "smart_launch_url": f"{service_base}/smart/launch",
        # the SMART app: launched from the sandbox's FHIR base only, as the client the sandbox registers
        "smart_issuers": f"{sandbox_base}/fhir",
        "smart_client_id": APP_CLIENT_ID,
    }
    return settings


@contextmanager
def start_ehr(state: Path, patients: int = PATIENTS) -> Iterator[Ehr]:
    """The whole stack. Both ports are chosen first: the service trusts the sandbox's URL and opens the SMART
    app at its own URL; the sandbox's config names the service's URL. The service is started as
    `run_cds_server` starts it, on the port chosen here (its settings need its URL before it starts)."""
    state.mkdir(parents=True, exist_ok=True)
    today = datetime.now(UTC).astimezone(ZoneInfo(CLINIC_TZ)).date()
    sandbox_port, service_port = free_port(), free_port()
    sandbox_base, service_base = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{service_port}"
    with start_fhir_server() as fhir:
        seed.load(fhir.base, seed.generate(patients, SEED, today, CLINIC_TZ))
        plans = tuple(seed.plan(patients, SEED, today))
        corpus = {sc.name: sc for sc in load_corpus(fhir.base)}
        backend_key(state)  # as `sandbox run` does: the key exists before the service reads it
        clock = Clock()
        service = create_app(Settings(**_service_settings(sandbox_base, service_base, state)), now=clock)
        with serve_app(service, service_port):
            cds = CdsServer(service_base, clock, service)
            config = default_config(
                base_url=sandbox_base, fhir_upstream=fhir.base, service_base=service_base, state_dir=state
            )
            app = create_sandbox_app(config)
            with serve_app(app, sandbox_port):
                yield Ehr(sandbox_base, service_base, fhir.base, state, today, plans, corpus, cds, app)
