"""Project hygiene: the two install lists agree, and the code is lint-clean."""

import re
import runpy
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


@pytest.mark.parametrize("name", ["environment.yml", "environment-cpu.yml"])
def test_environment_yml_installs_what_pyproject_declares(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / name).read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section
    options = [r for r in pip_section if r.startswith("--")]
    listed = {_normalise(r) for r in pip_section if r != "-e ." and r not in options}
    assert listed == declared, f"only in {name}: {listed - declared}; only in pyproject: {declared - listed}"
    cpu_index = ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    assert [option.split("#")[0].strip() for option in options] == (cpu_index if "cpu" in name else [])


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    check = subprocess.run([ruff, "check", "reid_utils", "tests", "notebooks", "benchmarks"], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", "reid_utils", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_every_cli_has_a_main_guard(monkeypatch, capsys):
    for module in ("synthetic", "prepare", "train", "series"):
        source = (ROOT / "reid_utils" / f"{module}.py").read_text()
        assert 'if __name__ == "__main__":' in source, module
    monkeypatch.setattr(sys, "argv", ["prepare", "--help"])
    monkeypatch.delitem(sys.modules, "reid_utils.prepare", raising=False)  # run as __main__, not the imported one
    with pytest.raises(SystemExit) as end:  # python -m reid_utils.prepare --help, without a second Python start
        runpy.run_module("reid_utils.prepare", run_name="__main__")
    assert end.value.code == 0 and "--src" in capsys.readouterr().out


def _imported_modules(path: Path) -> set[str]:
    """The ``reid_utils`` modules a file imports, at the top or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "reid_utils":
            parts = node.module.split(".")
            found |= {alias.name for alias in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("reid_utils.")}
    return found


def test_no_import_cycles_lazy_ones_included():
    modules = {path.stem: path for path in (ROOT / "reid_utils").glob("*.py") if path.stem != "__init__"}
    graph = {name: _imported_modules(path) & set(modules) - {name} for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert not cycles, f"modules on an import cycle: {cycles} ({ {n: sorted(graph[n]) for n in cycles} })"


def test_the_package_docstring_lists_every_module_once():
    import reid_utils

    modules = {path.stem for path in (ROOT / "reid_utils").glob("*.py") if path.stem != "__init__"}
    listed = re.findall(r"``(\w+)``", reid_utils.__doc__)
    named = [name for name in listed if name in modules]
    twice = {name for name in named if named.count(name) > 1}
    assert sorted(named) == sorted(modules), f"missing: {modules - set(named)}; listed twice: {twice}"


STAGE_MODULES = ("train", "runs", "data", "model", "test", "metrics")


def test_no_function_of_the_stage_modules_is_longer_than_90_lines():
    """Issue #21: the training loop and everything around it read top to bottom; a long function hides its order."""
    import ast

    long = []
    for name in STAGE_MODULES:
        path = ROOT / "reid_utils" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 90:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long


def test_the_package_loop_is_the_classic_one_without_wrappers():
    """The loss and the optimiser are not wrapped: precision is an autocast context and a GradScaler in the loop,
    warm-up is a line of it, and the triplet loss's features come from the network's forward pass (no hooks)."""
    import inspect

    import reid_utils.losses
    import reid_utils.speed
    import reid_utils.train

    phase = inspect.getsource(reid_utils.train.train_one_phase)
    for line in ("torch.autocast(device.type, dtype", "scaler.scale(loss).backward()", "scaler.step(optimizer)",
                 "loss = loss * warm_up.step()"):  # fmt: skip
        assert line in phase, line
    loop = inspect.getsource(reid_utils.train.train_model)
    order = ["set_epoch(epoch)", "train_one_phase(", "scheduler.step()", "save_network(", "draw_curve("]
    assert [loop.index(step) for step in order] == sorted(loop.index(step) for step in order)
    assert loop.count("\n") <= 90
    for module in (reid_utils.train, reid_utils.speed, reid_utils.losses):
        assert "register_forward_hook" not in inspect.getsource(module) or module is reid_utils.speed
        assert not hasattr(module, "ScaledLoss") and not hasattr(module, "ScaledOptimizer")
    assert "pool.register_forward_hook" not in inspect.getsource(reid_utils.losses)
    assert not hasattr(reid_utils.train, "PROFILES") and not hasattr(reid_utils.train, "trained_run")


def test_the_readme_states_how_much_code_a_student_reads():
    """README.md quotes the size of the taught part (issue #21); the quote follows the code it counts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("taught_lines", ROOT / "benchmarks" / "taught_lines.py")
    taught = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(taught)
    figures = taught.counts()
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for quote in (f"`BNNeck` (06): {figures['shown']:,} lines", f"hold {figures['stages']:,} lines",
                  f"the other {figures['rest']:,}."):  # fmt: skip
        assert quote in readme, f"README.md should say: {quote}"


def test_notebook_cells_hold_no_test_scaffolding():
    """nbval's markers are cell tags (nbval-ignore-output), not comments in the code a student reads (issue #21)."""
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            assert "NBVAL" not in cell.source.upper().replace("-", "_"), f"{path.name}: {cell.source[:60]!r}"


def _notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_notebooks_name_the_kernel_as_the_installed_ipykernel_does():
    """JupyterLab writes the kernel's own spec into a notebook it opens; a different one in the saved file
    makes a notebook a student only read "changed" (a save prompt, and a conflict at the next git pull)."""
    import nbformat
    from ipykernel.kernelspec import KERNEL_NAME, get_kernel_dict

    installed = get_kernel_dict()
    expected = {"name": KERNEL_NAME, "display_name": installed["display_name"], "language": installed["language"]}
    for path in _notebooks():
        assert nbformat.read(path, as_version=4).metadata.kernelspec == expected, path.name


def test_the_notebooks_show_static_pictures_not_widgets_that_need_a_kernel():
    """A saved widget view needs its model in a running kernel: reopened, it shows "Error displaying widget:
    model not found". The committed notebooks keep the picture or text each widget carries instead."""
    import nbformat

    for path in _notebooks():
        notebook = nbformat.read(path, as_version=4)
        outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
        views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert not views and "widgets" not in notebook.metadata, path.name
