"""The two private names dptrain imports from its peers, pinned by behaviour (DESIGN: no silent drift).

* Opacus ``_check_processed_flag`` / ``_mark_as_processed`` (``dptrain.trainers.opacus_backend``): our
  ``add_noise`` replaces Opacus's own (to draw noise once across ranks from our source) and must keep Opacus's
  guard that no clipped sum is used twice between ``zero_grad`` calls. Opacus has no public route to that guard;
  if these names change, the noise override must be rewritten, so this test fails first.
* jax-privacy ``auditing._epsilon_one_run`` (``dptrain.audit.bounds``): the Steinke-Nasr-Jagielski 2023 one-run
  bound. jax-privacy exposes it only through its canary-score auditor, which needs its own data layout; we call
  the solver directly and pin jax-privacy (pyproject ``audit`` extra) -- this test checks the signature and a
  value computed with jax-privacy 2.0.0.
"""

from __future__ import annotations

import inspect

import pytest


def test_opacus_processed_flag_guard_behaves_as_relied_on():
    torch = pytest.importorskip("torch")
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    t = torch.zeros(3)
    _check_processed_flag(t)  # fresh: accepted
    _mark_as_processed(t)
    with pytest.raises(ValueError):
        _check_processed_flag(t)  # used twice: refused
    _check_processed_flag([torch.zeros(2)])  # lists are accepted too (add_noise passes tensors one by one)


def test_jax_privacy_one_run_solver_signature_and_value():
    auditing = pytest.importorskip("jax_privacy.auditing")
    sig = inspect.signature(auditing._epsilon_one_run)
    assert list(sig.parameters) == ["eps_lo", "m", "n_guess", "n_correct", "significance", "delta"]
    # 90 of 100 guesses right among 1000 canaries, 95% confidence, delta 1e-5 (jax-privacy 2.0.0)
    assert auditing._epsilon_one_run(0.0, 1000, 100, 90, 0.05, 1e-5) == pytest.approx(1.6261436787, rel=1e-6)
