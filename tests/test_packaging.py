"""Runtime dependencies only in the image and under `make run`; a README a clone can follow."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV_ONLY = ("httpx", "pytest", "hypothesis", "ruff", "mypy", "schemathesis", "asgi-lifespan")


def test_runtime_dependencies_hold_no_dev_tool() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert not [tool for tool in DEV_ONLY if tool in runtime]
    assert any(d.startswith("httpx") for d in project["optional-dependencies"]["dev"])


def test_the_services_and_the_cli_run_without_the_dev_tools() -> None:
    # What the image and `make run` have: no httpx, no test tools. Importing every entry point
    # and asking the CLI for help must work with them blocked.
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {[t.replace('-', '_') for t in DEV_ONLY]!r}:\n"
        "            raise ImportError('dev-only: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import telemetry_service.main, swamp_app.main, swamp_club.cli, swamp_club.servers\n"
        "telemetry_service.main.create_app(); swamp_app.main.create_app()\n"
        "sys.argv = ['swamp-club', '--help']\n"
        "swamp_club.cli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "queue" in done.stdout


def test_make_run_installs_no_dev_toolchain() -> None:
    plan = subprocess.run(
        ["make", "-n", "-B", "run"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "-e" in line]
    assert installs
    assert installs == [line for line in installs if "dev" not in line], installs


def test_the_readme_stands_alone() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme  # a clone has no such folder
    assert "Motor" in readme
    assert "mongomock" in readme
