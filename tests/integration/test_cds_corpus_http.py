"""The whole scenario corpus through HTTP: every `tests/scenarios/<name>/request.json` POSTed with its full
prefetch to the running service answers the rule codes of its expected.json, and exactly the cards
`imid-rems evaluate` prints for it (the CLI and the service share `evaluate_request`; this proves the
HTTP layer adds, drops and reorders nothing).

One server per clinic zone (the zone is a server setting); the clock is set per scenario.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from cds_hooks.cli import main
from tests.support.cds_server import CdsServer, Clock, run_cds_server
from tests.support.fhir_load import SCENARIOS_DIR, card_codes, rule_codes, scenario, scenario_names

SERVICE = {
    "order-sign": "imid-rems-order-sign",
    "order-select": "imid-rems-order-select",
    "patient-view": "imid-rems-patient-view",
    "medication-refill": "imid-rems-medication-refill",
}
NAMES = scenario_names()
ZONES = sorted({scenario(n).timezone for n in NAMES})


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, CdsServer]]:
    """One running service per clinic zone of the corpus."""
    folder = tmp_path_factory.mktemp("cds-corpus")
    with ExitStack() as stack:
        yield {
            zone: stack.enter_context(
                run_cds_server(
                    Clock(), database_url=f"sqlite:///{folder / f'{i}.sqlite'}", cds_auth="off", clinic_tz=zone
                )
            )
            for i, zone in enumerate(ZONES)
        }


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


def test_corpus_has_every_zone_and_hook_it_claims() -> None:
    assert len(NAMES) >= 40
    assert "America/New_York" in ZONES and len(ZONES) >= 2
    assert {scenario(n).hook for n in NAMES} >= {"order-sign", "order-select", "medication-refill"}


@pytest.mark.parametrize("name", NAMES)
def test_scenario_over_http_answers_like_the_cli_and_expected(
    name: str, servers: dict[str, CdsServer], http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = scenario(name)
    server = servers[sc.timezone]
    server.clock.now = sc.now
    response = http.post(server.url(f"/cds-services/{SERVICE[sc.hook]}"), json=sc.request)
    assert response.status_code == 200, response.text
    over_http = response.json()

    request = SCENARIOS_DIR / name / "request.json"
    code = main(["evaluate", str(request), "--now", sc.now.isoformat(), "--tz", sc.timezone])
    out = capsys.readouterr()
    assert code == 0, out.err
    from_cli = json.loads(out.out)

    assert rule_codes(over_http) == sc.codes, sc.description
    assert rule_codes(from_cli) == sc.codes, sc.description
    assert over_http == from_cli
    assert card_codes(over_http) == (["refill-draft"] if sc.hook == "medication-refill" else [])
