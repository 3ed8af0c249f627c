"""A realistic order-sign request with a full prefetch of about 40 resources, for benchmarks.

Built from the clean scenario `lenalidomide-adult-female-rp-ongoing-clean` (an adult woman who can get
pregnant, month 9 of lenalidomide, everything in order) by adding the history a real chart has: the
earlier monthly orders and dispenses, a pregnancy test before each fill, fortnightly CBCs, creatinine,
weight and two unrelated problems. All added data is older than the scenario's own, so the expected
answer stays the scenario's: no card. `now` and zone come from its expected.json.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "lenalidomide-adult-female-rp-ongoing-clean"


def _shift(value: str, days: int) -> str:
    return (datetime.fromisoformat(value) - timedelta(days=days)).isoformat()


def large_order_sign() -> tuple[dict[str, Any], datetime, ZoneInfo]:
    """(request, now, clinic zone) with 40 prefetched resources."""
    request = json.loads((SCENARIO / "request.json").read_text(encoding="utf-8"))
    expected = json.loads((SCENARIO / "expected.json").read_text(encoding="utf-8"))
    pre = request["prefetch"]
    meds, disp, obs, conds = (pre[k]["entry"] for k in ("medications", "dispenses", "observations", "conditions"))
    last_order = next(e["resource"] for e in meds if e["resource"]["status"] == "completed")
    last_fill = disp[0]["resource"]
    hcg = next(e["resource"] for e in obs if e["resource"]["id"].startswith("obs-hcg"))
    anc = next(e["resource"] for e in obs if e["resource"]["id"].startswith("obs-anc"))
    plt = next(e["resource"] for e in obs if e["resource"]["id"].startswith("obs-plt"))

    def clone(res: dict[str, Any], rid: str, days: int, *fields: str) -> dict[str, Any]:
        out = copy.deepcopy(res)
        out["id"] = rid
        for f in fields:
            if f in out:
                out[f] = _shift(out[f], days)
        return out

    for month in range(1, 6):  # five earlier monthly cycles
        back = 28 * month
        meds.append({"resource": clone(last_order, f"medrx-hist-{month}", back, "authoredOn")})
        d = clone(last_fill, f"meddisp-hist-{month}", back, "whenHandedOver", "whenPrepared")
        d["authorizingPrescription"] = [{"reference": f"MedicationRequest/medrx-hist-{month}"}]
        disp.append({"resource": d})
        obs.append({"resource": clone(hcg, f"obs-hcg-hist-{month}", back, "effectiveDateTime", "issued")})
    for fortnight in range(1, 7):  # CBCs every two weeks
        back = 14 * fortnight
        obs.append({"resource": clone(anc, f"obs-anc-hist-{fortnight}", back, "effectiveDateTime", "issued")})
        obs.append({"resource": clone(plt, f"obs-plt-hist-{fortnight}", back, "effectiveDateTime", "issued")})
    subject = anc["subject"]
    when = anc["effectiveDateTime"]
    for i, back in enumerate((0, 90)):
        obs.append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": f"obs-creat-{i}",
                    "status": "final",
                    "category": anc.get("category", []),
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]},
                    "subject": subject,
                    "effectiveDateTime": _shift(when, back),
                    "valueQuantity": {
                        "value": 0.8,
                        "unit": "mg/dL",
                        "system": "http://unitsofmeasure.org",
                        "code": "mg/dL",
                    },
                }
            }
        )
    obs.append(
        {
            "resource": {
                "resourceType": "Observation",
                "id": "obs-weight-0",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
                "subject": subject,
                "effectiveDateTime": _shift(when, 30),
                "valueQuantity": {"value": 64, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
            }
        }
    )
    for i, (code, display) in enumerate((("I10", "Essential hypertension"), ("E78.5", "Hyperlipidemia"))):
        cond = copy.deepcopy(conds[0]["resource"])
        cond["id"] = f"cond-other-{i}"
        cond["code"] = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code, "display": display}]}
        conds.append({"resource": cond})
    return request, datetime.fromisoformat(expected["now"]), ZoneInfo(expected["timezone"])


def count_resources(request: dict[str, Any]) -> int:
    return sum(
        len(v.get("entry", [])) if v.get("resourceType") == "Bundle" else 1
        for v in (request.get("prefetch") or {}).values()
        if isinstance(v, dict)
    )
