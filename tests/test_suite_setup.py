"""The test setup itself: a notebook's cells must run in one kernel, in order, whatever pytest-xdist does.

The notebooks are tested cell by cell (nbval), and each cell needs the variables of the cells before it. If
pytest-xdist spreads one notebook over two workers, a cell runs in a fresh kernel and fails with a NameError
that hides the cause. That happened silently with pytest 9.2 (pytest-xdist issue #1386).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_notebook_group_is_one_unit_of_work_and_other_tests_spread():
    conftest = _root_conftest()
    cells = {
        path.name: [f"notebooks/{path.name}::Cell {k}" for k in range(3)]
        for path in sorted((ROOT / "notebooks").glob("*.ipynb"))
    }
    assert len(cells) >= 6
    units = {name: {conftest.group_of(nodeid) for nodeid in ids} for name, ids in cells.items()}
    assert all(len(unit) == 1 for unit in units.values()), units  # each notebook: one unit
    evaluated_run = {name[:2]: unit for name, unit in units.items() if name[:2] in ("03", "04", "05")}
    assert len({frozenset(unit) for unit in evaluated_run.values()}) == 1  # 04 and 05 evaluate what 03 trained
    assert len({frozenset(unit) for unit in units.values()}) == len(units) - 2  # the other notebooks: one each
    one = "tests/test_train.py::test_a", "tests/test_train.py::test_b[1]"
    assert conftest.group_of(one[0]) == conftest.group_of(one[1])  # its module fixture trains once
    spread = "tests/test_data.py::test_a", "tests/test_data.py::test_b"
    assert conftest.group_of(spread[0]) != conftest.group_of(spread[1])


def _notebook(path: Path, cells: int) -> None:
    """Each cell needs the variable the one before it made: a cell run in another kernel fails."""
    sources = ["x0 = 0"] + [f"x{k} = x{k - 1} + 1\nprint(x{k})" for k in range(1, cells)]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    for k, cell in enumerate(notebook.cells):
        cell.execution_count = k + 1
    for k, cell in enumerate(notebook.cells[1:], start=1):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{k}\n")]
    nbformat.write(notebook, path)


def _pytest_two_workers(folder: Path, dist: str) -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    (folder / "pytest.ini").write_text("[pytest]\n")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "xdist",
        "-n",
        "2",
        "--dist",
        dist,
        "--nbval",
        "--nbval-current-env",
        "-p",
        "no:cacheprovider",
        "-q",
        "-p",
        "no:randomly",
        str(folder),
    ]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)


def test_two_workers_keep_each_notebooks_cells_in_one_kernel(tmp_path):
    """The suite's own setting (``-n 2 --dist loadgroup`` with this conftest), with the installed pytest and
    pytest-xdist: two notebooks whose cells each need the cell before, every cell passes."""
    for name in ("01_a.ipynb", "02_b.ipynb"):
        _notebook(tmp_path / name, cells=6)
    run = _pytest_two_workers(tmp_path, "loadgroup")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "12 passed" in run.stdout


class _Cell:
    def __init__(self, nodeid, session):
        self.nodeid, self.path, self.session = nodeid, Path(nodeid.split("::")[0]), session
        self.config = session.config


def test_a_cell_whose_predecessor_ran_elsewhere_fails_naming_the_cause():
    """What the suite does if its grouping ever stops working: the first cell run without the one before it
    fails with the reason, not a NameError from inside the notebook."""
    conftest = _root_conftest()
    session = type("Session", (), {})()
    session.config = type("Config", (), {"stash": pytest.Stash()})()
    session.items = [_Cell(f"notebooks/01_a.ipynb::Cell {k}", session) for k in range(3)]
    more = "tests/test_data.py::test_x", "notebooks/03_x.ipynb::Cell 0", "notebooks/04_x.ipynb::Cell 0"
    session.items += [_Cell(nodeid, session) for nodeid in more]
    first, second, third, other, training, evaluation = session.items
    conftest.pytest_runtest_setup(first)  # opens the notebook
    conftest.pytest_runtest_setup(other)  # not a notebook: no predecessor
    with pytest.raises(pytest.fail.Exception, match="split over pytest-xdist workers"):
        conftest.pytest_runtest_setup(third)  # this process never ran Cell 1
    with pytest.raises(pytest.fail.Exception, match="never ran notebooks/03_x.ipynb::Cell 0"):
        conftest.pytest_runtest_setup(evaluation)  # 04 evaluates the run 03 trains: one group, one process
    conftest.pytest_runtest_setup(training)
    conftest.pytest_runtest_setup(second)  # in order: fine
