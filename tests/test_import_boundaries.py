"""The import contracts hold, and they really fail when a service imports the other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared_contracts", "telemetry_service", "swamp_app", "swamp_club")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(executable), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(cwd), "PATH": str(executable.parent)},
        check=False,
    )


def copy_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_contracts_hold_for_the_real_tree(tmp_path: Path) -> None:
    result = lint_imports(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("swamp_app/settings.py", "import telemetry_service.settings"),
        ("telemetry_service/settings.py", "import swamp_app.settings"),
        ("shared_contracts/names.py", "import swamp_app"),
    ],
)
def test_contract_fails_on_a_forbidden_import(tmp_path: Path, module: str, line: str) -> None:
    tree = copy_tree(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
