"""The corpus as a whole: every rule code, drug, risk category and hook covered; files well formed
(offsets on every dateTime, sorted real rule codes). See check_corpus.py."""

from __future__ import annotations

import pytest

from tests.scenarios import check_corpus


def test_corpus_checker_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code = check_corpus.main()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rule codes covered: 22/22" in out
