"""Shared fixtures; also switches weight downloads off for everything the tests start (kernels included)."""

import os
import tempfile

import pytest

os.environ["REID_OFFLINE"] = "1"  # never download ImageNet weights during tests
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="reid-torch-home-")  # and ignore any cached ones


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory):
    """A small synthetic Market-1501 folder, generated once per test session."""
    from reid_utils.synthetic import generate_market

    return generate_market(tmp_path_factory.mktemp("market") / "Market", seed=3, train_ids=8, test_ids=6).root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_market, tmp_path_factory):
    from reid_utils.prepare import prepare_market

    return prepare_market(tiny_market, tmp_path_factory.mktemp("prepared") / "tiny", quiet=True).root


os.environ["REID_DATASET"] = "synthetic"  # notebooks use the embedded set even where Market-1501 is installed
os.environ.pop("MARKET1501_DIR", None)
