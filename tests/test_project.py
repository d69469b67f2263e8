"""Project hygiene: the two install lists agree, and the code is lint-clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> str:
    return requirement.replace(" ", "").lower()


def test_environment_yml_installs_what_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section
    listed = {_normalise(r) for r in pip_section if r != "-e ."}
    assert listed == declared, f"only in environment.yml: {listed - declared}; only in pyproject: {declared - listed}"


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    check = subprocess.run([ruff, "check", "reid_utils", "tests", "notebooks", "benchmarks"], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", "reid_utils", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_every_cli_has_a_main_guard():
    for module in ("synthetic", "prepare", "train", "series"):
        source = (ROOT / "reid_utils" / f"{module}.py").read_text()
        assert 'if __name__ == "__main__":' in source, module
    help_text = subprocess.run([sys.executable, "-m", "reid_utils.prepare", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--src" in help_text.stdout
