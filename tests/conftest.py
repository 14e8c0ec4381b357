"""Every test gets its own $DPTRAIN_HOME (dataset budgets live there): no test touches the real home, and a
budget one test creates never charges another test's runs. Session-scoped fixtures get one home of their own."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _dptrain_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DPTRAIN_HOME", str(tmp_path_factory.mktemp("dptrain-home")))


def pytest_configure(config):
    # collection-time code runs before any fixture: give it a home too
    import tempfile

    os.environ.setdefault("DPTRAIN_HOME", tempfile.mkdtemp(prefix="dptrain-home-"))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Module/session fixtures run before the per-test autouse home: each gets a fresh home of its own while
    it sets up, so their runs never share (and exhaust) a dataset budget with another fixture's runs."""
    if fixturedef.scope == "function":
        yield
        return
    import tempfile

    old = os.environ.get("DPTRAIN_HOME")
    os.environ["DPTRAIN_HOME"] = tempfile.mkdtemp(prefix=f"dptrain-home-{fixturedef.argname}-")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DPTRAIN_HOME", None)
        else:
            os.environ["DPTRAIN_HOME"] = old


@pytest.fixture
def pinned_count(monkeypatch):
    """The DP count's Gaussian draw pinned to +2.5 std (its noise is the OS CSPRNG's): the released count then
    never equals the exact one, so a test can search release/ for the exact count."""
    import numpy as np

    import dptrain.trainers.sampler as sampler

    monkeypatch.setattr(sampler, "secure_normal", lambda n: np.full(n, 2.5))
