"""Every test gets its own $DPTRAIN_HOME (dataset budgets live there): no test touches the real home, and a
budget one test creates never charges another test's runs. Session-scoped fixtures get one home of their own."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _dptrain_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DPTRAIN_HOME", str(tmp_path_factory.mktemp("dptrain-home")))


def pytest_configure(config):
    # session/module fixtures run before the autouse fixture: give them a home too (removed with the tmp dirs)
    import tempfile

    os.environ.setdefault("DPTRAIN_HOME", tempfile.mkdtemp(prefix="dptrain-home-"))


@pytest.fixture
def pinned_count(monkeypatch):
    """The DP count's Gaussian draw pinned to +2.5 std (its noise is the OS CSPRNG's): the released count then
    never equals the exact one, so a test can search release/ for the exact count."""
    import numpy as np

    import dptrain.trainers.sampler as sampler

    monkeypatch.setattr(sampler, "secure_normal", lambda n: np.full(n, 2.5))
