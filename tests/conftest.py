"""Shared fixtures; also switches weight downloads off for everything the tests start (kernels included)."""

import pytest

from reid_utils.series import use_test_environment

use_test_environment()  # synthetic data, no downloads, no cached weights: the same outputs on every machine


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory):
    """A small synthetic Market-1501 folder, generated once per test session."""
    from reid_utils.synthetic import generate_market

    return generate_market(tmp_path_factory.mktemp("market") / "Market", seed=3, train_ids=8, test_ids=6).root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_market, tmp_path_factory):
    from reid_utils.prepare import prepare_market

    return prepare_market(tiny_market, tmp_path_factory.mktemp("prepared") / "tiny", quiet=True).root
