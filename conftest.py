"""Shared fixtures; also switches weight downloads off for everything the tests start (kernels included).

It sits at the root so that it also holds for `pytest notebooks/03_training.ipynb` alone (in tests/ it held
only when tests/ was collected too; alone, a notebook's cells ran in two kernels and outside the test environment).

The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml). Each notebook is one group, so
its cells run in order in one kernel; notebooks 03-05 are one group, because 04 and 05 evaluate the run
that 03 trains. Everything else may run on either worker.

How the groups reach pytest-xdist: through its scheduler hook (``pytest_xdist_make_scheduler``), which sees
every test's node id and puts the tests of one group into one unit of work. Not through ``xdist_group``
marks: xdist writes those into the private ``item._nodeid``, which pytest 9.2 no longer reads (pytest-xdist
issue #1386), and every notebook's cells were then spread over both workers. As a second line of defence,
a notebook cell whose predecessor this process never ran fails at once with a message that says why.
"""

import os

import pytest

from reid_utils.series import use_test_environment  # a light import: the xdist controller never loads torch

use_test_environment()  # synthetic data, no downloads, no cached weights: the same outputs on every machine
# Two workers share two cores here, and kernels compute with two threads: threads that wait sleep instead of
# spinning on a core the other worker needs. (Only how idle threads wait; not a single number changes.)
os.environ["OMP_WAIT_POLICY"] = "passive"
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # The tests' own tiny models gain little from a second thread, and the other worker wants the core.
    # (Kernels and command-line children still compute with OMP_NUM_THREADS=2, as the committed outputs did.)
    torch.set_num_threads(1)

NOTEBOOK_GROUPS = {"03": "03-05", "04": "03-05", "05": "03-05"}
# Modules whose module-scoped fixtures train a run: on one worker, that run is trained once, not once per worker.
MODULES_ON_ONE_WORKER = {"test_train.py", "test_runs.py", "test_evaluation.py"}
# The longest work first (pytest-xdist hands it out in this order, with --no-loadscope-reorder): otherwise a
# 40-second test can start last, on one worker, while the other has nothing left to do. The rest keeps its order.
LONGEST_FIRST = [
    "notebooks:06",  # the ablation: fifteen trainings
    "notebooks:03-05",  # the demo training and the notebooks that evaluate it
    "tests/test_series.py::test_notebooks_03_and_04_under_another_profile",
    "tests/test_ddp.py::",
    "tests/test_reliability.py::test_running_a_notebook_twice_in_one_kernel",
    "tests/test_train.py",
]


def group_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its notebook group, its module, or itself alone.

    Only the node id's text is read (``path::name``), which every pytest and pytest-xdist version shares.
    """
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".ipynb"):
        return "notebooks:" + NOTEBOOK_GROUPS.get(name[:2], name[:2])
    return path if name in MODULES_ON_ONE_WORKER else nodeid


def _rank(nodeid: str) -> int:
    group = group_of(nodeid)
    for rank, name in enumerate(LONGEST_FIRST):
        if name == group or nodeid.startswith(name):
            return rank
    return len(LONGEST_FIRST)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # tryfirst: ahead of pytest-xdist's own choice
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` (pyproject.toml) hands out the units of `group_of`, largest first."""
    if config.getvalue("dist") != "loadgroup":
        return None  # another --dist asked for on the command line: pytest-xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _rank(item.nodeid))  # stable: a notebook's cells keep their order


CELLS_RAN = pytest.StashKey[set]()  # the notebook cells this process has started


def cell_before(item) -> str | None:
    """The node id of the notebook cell that must have run in this kernel before ``item`` (None: ``item`` opens one)."""
    if item.path.suffix != ".ipynb":
        return None
    group, previous = group_of(item.nodeid), None
    for other in item.session.items:
        if other is item:
            return previous
        if other.path.suffix == ".ipynb" and group_of(other.nodeid) == group:
            previous = other.nodeid
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Fail loudly when a notebook's cells are split over processes, instead of a NameError three cells later."""
    ran = item.config.stash.setdefault(CELLS_RAN, set())
    before = cell_before(item)
    ran.add(item.nodeid)
    if before is not None and before not in ran:
        pytest.fail(
            f"{item.nodeid} would run in a kernel that never ran {before}: this notebook's cells were split over "
            "pytest-xdist workers (its grouping did not apply; see conftest.py). Run `pytest -n 0`, and report "
            "your pytest and pytest-xdist versions.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory):
    """A small synthetic Market-1501 folder, generated once per test session."""
    from reid_utils.synthetic import generate_market

    return generate_market(tmp_path_factory.mktemp("market") / "Market", seed=3, train_ids=8, test_ids=6).root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_market, tmp_path_factory):
    from reid_utils.prepare import prepare_market

    return prepare_market(tiny_market, tmp_path_factory.mktemp("prepared") / "tiny", quiet=True).root
