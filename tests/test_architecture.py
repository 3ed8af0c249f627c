"""The house rules that keep the layers honest: `rems/` (the domain) imports only the standard
library and itself; `fhir_mappings/` never imports a front door."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of `package` imports (absolute imports only; relative
    imports stay inside the package by construction)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_domain_imports_only_stdlib_and_itself() -> None:
    allowed = set(sys.stdlib_module_names) | {"rems", "__future__"}
    offenders = {f: sorted(n - allowed) for f, n in imported_modules("rems").items() if n - allowed}
    assert offenders == {}, f"rems/ must not reach outward: {offenders}"


@pytest.mark.parametrize("front_door", ["cds_hooks", "smart_app"])
def test_mappings_do_not_import_front_doors(front_door: str) -> None:
    offenders = [f for f, n in imported_modules("fhir_mappings").items() if front_door in n]
    assert offenders == []


def test_domain_walk_sees_files() -> None:
    """Guard against the walk silently finding nothing (a moved package would pass the test above)."""
    files = imported_modules("rems")
    assert "rems/rules.py" in files and "rems" in files["rems/rules.py"]


def test_walker_catches_an_outward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker itself must flag a third-party import (so the domain test can fail)."""
    pkg = tmp_path / "fake_domain"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import httpx\nfrom fastapi import FastAPI\nimport os\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imported_modules("fake_domain")["fake_domain/bad.py"]
    assert found - set(sys.stdlib_module_names) == {"httpx", "fastapi"}


@pytest.mark.parametrize("package", ["rems", "fhir_mappings", "cds_hooks", "smart_app"])
def test_product_does_not_import_the_sandbox(package: str) -> None:
    """The sandbox EHR is a development tool: the product never depends on it. The one exception is the
    `imid-rems sandbox` command, which loads it lazily inside `cds_hooks.cli.main`."""
    allowed = {"cds_hooks/cli.py"}
    offenders = [f for f, n in imported_modules(package).items() if "sandbox" in n and f not in allowed]
    assert offenders == []


def test_cli_loads_the_sandbox_only_when_asked() -> None:
    tree = ast.parse((ROOT / "cds_hooks" / "cli.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sandbox") for n in top_level)
    assert "sandbox" in imported_modules("cds_hooks")["cds_hooks/cli.py"]  # the lazy import is still seen
