"""The README's rule table lists every rule code, and the first screen shows the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from rems.findings import RULES, RuleCode

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_rule_table_lists_every_code_once() -> None:
    section = README.split("## The rules at a glance", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE)
    assert sorted(rows) == sorted(code.value for code in RuleCode)
    for code in RuleCode:
        assert RULES[code].meaning in README


def test_first_screen_shows_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make run" in first_screen and "make test" in first_screen
