"""Shared fixtures; also switches weight downloads off for everything the tests start (kernels included).

It sits at the root so that it also holds for `pytest notebooks/03_training.ipynb` alone (in tests/ it held
only when tests/ was collected too; alone, a notebook's cells ran in two kernels and outside the test environment).

The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml). Each notebook is one group, so
its cells run in order in one kernel; notebooks 03-05 are one group, because 04 and 05 evaluate the run
that 03 trains. Everything else may run on either worker.
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
    "06",  # the ablation: fifteen trainings
    "03-05",  # the demo training and the notebooks that evaluate it
    "tests/test_series.py::test_notebooks_03_and_04_under_another_profile",
    "tests/test_ddp.py::",
    "tests/test_reliability.py::test_running_a_notebook_twice_in_one_kernel",
    "test_train",
]


def _group(item) -> str | None:
    if item.path.suffix == ".ipynb":
        number = item.path.name[:2]
        return NOTEBOOK_GROUPS.get(number, number)
    return item.path.stem if item.path.name in MODULES_ON_ONE_WORKER else None


def _rank(item, group: str | None) -> int:
    for rank, name in enumerate(LONGEST_FIRST):
        if name == group or item.nodeid.startswith(name):
            return rank
    return len(LONGEST_FIRST)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {item.nodeid: _group(item) for item in items}
    for item in items:
        if groups[item.nodeid] is not None:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items.sort(key=lambda item: _rank(item, groups[item.nodeid]))  # stable: a notebook's cells keep their order


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory):
    """A small synthetic Market-1501 folder, generated once per test session."""
    from reid_utils.synthetic import generate_market

    return generate_market(tmp_path_factory.mktemp("market") / "Market", seed=3, train_ids=8, test_ids=6).root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_market, tmp_path_factory):
    from reid_utils.prepare import prepare_market

    return prepare_market(tiny_market, tmp_path_factory.mktemp("prepared") / "tiny", quiet=True).root
