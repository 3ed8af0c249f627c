"""The scenario corpus: every `tests/scenarios/<name>/request.json` answered by `imid-rems evaluate`
gives exactly the rule codes in its `expected.json` (sorted, one per card)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cds_hooks.cards import RULE_SYSTEM
from cds_hooks.cli import main

HERE = Path(__file__).parent
SCENARIOS = sorted(p.parent.name for p in HERE.glob("*/request.json"))


def expected(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((HERE / name / "expected.json").read_text(encoding="utf-8"))
    return data


def cli_args(name: str) -> list[str]:
    """`evaluate` arguments for a scenario: its request, clock and clinic zone."""
    exp = expected(name)
    return ["evaluate", str(HERE / name / "request.json"), "--now", str(exp["now"]), "--tz", str(exp["timezone"])]


def run_cli(name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code = main(cli_args(name))
    out = capsys.readouterr()
    assert code == 0, out.err
    result: dict[str, object] = json.loads(out.out)
    return result


def response_hook(name: str) -> str:
    hook: str = json.loads((HERE / name / "request.json").read_text(encoding="utf-8"))["hook"]
    return hook


def test_corpus_is_large_enough() -> None:
    assert len(SCENARIOS) >= 40


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_codes(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    response = run_cli(name, capsys)
    cards = response["cards"]
    assert isinstance(cards, list)
    got = sorted(card["source"]["topic"]["code"] for card in cards if card["source"]["topic"]["system"] == RULE_SYSTEM)
    assert got == expected(name)["codes"], expected(name)["description"]
    # Beyond the rule findings: medication-refill adds one drafted-prescription card (refill-draft
    # topic) per IMiD being renewed; order-select/-sign add none.
    others = [c["source"]["topic"]["code"] for c in cards if c["source"]["topic"]["system"] != RULE_SYSTEM]
    assert others == (["refill-draft"] if response_hook(name) == "medication-refill" else [])


def test_console_script_answers_like_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """The installed `imid-rems` entry point prints the same JSON as the in-process call."""
    name = SCENARIOS[0]
    script = Path(sys.executable).parent / "imid-rems"
    proc = subprocess.run(
        [str(script), *cli_args(name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == run_cli(name, capsys)


def test_clean_adult_male_lenalidomide_has_no_warning_or_critical(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue acceptance: lenalidomide for an adult male, 28 days, no refills, authorization number and
    risk category, nothing else in the chart: no warning or critical card (info review flags allowed)."""
    response = run_cli("lenalidomide-adult-male-nothing-else-in-chart", capsys)
    cards = response["cards"]
    assert isinstance(cards, list)
    assert [c["indicator"] for c in cards if c["indicator"] in ("warning", "critical")] == []
    assert {c["source"]["topic"]["code"] for c in cards} <= {"cbc-overdue", "vte-prophylaxis-missing"}
