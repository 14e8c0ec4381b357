"""The JAX speed-ups change how things are computed, never what: each fast formulation against its reference.

* ``fast_clip.conv_patches`` (strided slices, feature-major) equals ``lax.conv_general_dilated_patches`` and,
  contracted with the kernel, ``lax.conv_general_dilated`` -- values and gradients;
* ``flax_models.GroupNorm`` (per-channel sums, then groups) equals flax's ``nn.GroupNorm``, values and gradients;
* ``flax_models.max_pool2`` (reshape + max) equals ``nn.max_pool`` (2x2, stride 2, floor), values and gradients;
* fast clipping of the built-in CNNs (ImageCNN: SAME, stride 2; SmallCNN: VALID, pooling) gives the vmap
  per-example norms and clipped sums, per example and per unit;
* one compiled step per run: plain Poisson batches of any size, and per-unit (augmult) batches, compile the step
  once; a batch spread over several chunks equals the same batch in one chunk, with the noise added once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import accounting as acc
from dptrain.config import ModelConfig, OptimizerConfig
from dptrain.models import flax_models as fm
from dptrain.trainers import fast_clip
from dptrain.trainers.base import Batch
from dptrain.trainers.jax_backend import JaxTrainer
from dptrain.trainers.plan import PrivacyPlan

from .test_fast_clip import PER_ROW_AND_UNIT, _assert_matches, _run

CONV_CASES = [((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"), ((3, 3), (1, 1), "VALID"), ((2, 3), (2, 1), "VALID"),
              ((3, 2), (2, 2), ((1, 0), (2, 1))), ((1, 1), (1, 1), "SAME")]


@pytest.mark.parametrize("kernel,strides,padding", CONV_CASES)
def test_conv_patches_equal_lax_patches_and_convolution(kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 9, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 4, 5)), jnp.float32)
    got = fast_clip.conv_patches(x, kernel, strides, padding)  # (B, kh kw C, T), features (i, j, c)
    ref = lax.conv_general_dilated_patches(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, ho, wo, _ = ref.shape
    ref = ref.reshape(b, ho * wo, 4, *kernel).transpose(0, 3, 4, 2, 1).reshape(b, -1, ho * wo)  # (c, i, j) -> (i, j, c)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)

    def via_patches(w, x):
        p = fast_clip.conv_patches(x, kernel, strides, padding)
        return jnp.einsum("bkt,ko->bto", p, w.reshape(-1, w.shape[-1])).reshape(b, ho, wo, -1)

    def via_lax(w, x):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(via_patches(w, x), via_lax(w, x), rtol=1e-5, atol=1e-5)
    g = [jax.grad(lambda w, x, f=f: jnp.sum(jnp.tanh(f(w, x))), argnums=(0, 1))(w, x) for f in (via_patches, via_lax)]
    for a, r in zip(g[0], g[1], strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((4, 6, 5, 8), 4), ((3, 7, 6), 2), ((2, 5, 5, 4), 1), ((3, 6), 3)])
def test_group_norm_equals_flax(shape, groups):
    rng = np.random.default_rng(1)
    x = jnp.asarray(3.0 + 2.0 * rng.normal(size=shape), jnp.float32)  # a nonzero mean: the centring matters
    ours, ref = fm.GroupNorm(groups), nn.GroupNorm(num_groups=groups, epsilon=1e-5)
    v = ours.init(jax.random.key(0), x)
    v = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), v)  # scale/bias != 1/0
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-4, atol=1e-5)

    def loss(f, v, x):
        return jnp.sum(jnp.sin(f.apply(v, x)))

    for a, r in zip(jax.tree.leaves(jax.grad(lambda v, x: loss(ours, v, x), argnums=(0, 1))(v, x)),
                    jax.tree.leaves(jax.grad(lambda v, x: loss(ref, v, x), argnums=(0, 1))(v, x)), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [(6, 8), (13, 11), (5, 5)])
def test_max_pool2_equals_flax_max_pool(hw):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, *hw, 3)), jnp.float32)  # no ties
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(fm.max_pool2(x), ref(x))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(jnp.cos(fm.max_pool2(x))))(x),
                                  jax.grad(lambda x: jnp.sum(jnp.cos(ref(x))))(x))


UNITS = np.array([0, 0, 1, 2, 2, 2], np.int32)


@pytest.mark.parametrize("name", ["image_cnn", "small_cnn"])
def test_fast_clipping_of_the_builtin_cnns_matches_vmap(name):
    """Norms and clipped sums from the conv patches rule equal vmap per-example (and per-unit) gradients."""
    rng = np.random.default_rng(3)
    if name == "image_cnn":
        model = fm.ImageCNN(in_shape=(2, 8, 8), num_classes=3, channels=(4, 8), strides=(2, 2), groups=2)
        x = jnp.asarray(rng.normal(size=(len(UNITS), 2, 8, 8)), jnp.float32)
    else:
        model = fm.SmallCNN(num_classes=3, height=14, width=13, channels=2)
        x = jnp.asarray(rng.normal(size=(len(UNITS), 14, 13, 2)), jnp.float32)
    for result in _run(model, x, 5, PER_ROW_AND_UNIT, UNITS, weights="random"):
        _assert_matches(result)


# ---- one compiled step per run ----


def _poisson_plan(mode="dp", unit="example", units=200, expected=16.0):
    return PrivacyPlan(scheme=acc.PoissonSampling(expected / units), noise_multiplier=1.0 if mode == "dp" else 0.0,
                       clipping_norm=None if mode == "non_private" else 0.5, steps=10,
                       expected_batch_size=expected, delta=1e-5, accountant="pld", mode=mode, privacy_unit=unit,
                       size=units)


def _data(n=200, d=6):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)


def _trainer(plan, max_physical=1024, clipping="auto"):
    tr = JaxTrainer(OptimizerConfig(name="sgd", lr=0.2, momentum=0.9), clipping=clipping,
                    max_physical_batch_size=max_physical)
    tr.init(fm.build_flax_model(ModelConfig(hidden=[8]), 6, 2), plan, seed=0, dp_seed=9)
    return tr


@pytest.mark.parametrize("mode", ["dp", "non_private"])
def test_poisson_batches_of_any_size_compile_the_step_once(mode):
    x, y = _data()
    tr = _trainer(_poisson_plan(mode))
    for n in (16, 0, 9, 23, 40, 100, 3):  # 40 and 100: above the chunk (E + 4 sqrt(E) + 1 -> 40 rows)
        rows = np.arange(n)
        tr.dp_step(Batch(x[rows], y[rows], rows))
    assert tr.compilations() <= 1  # 0: an earlier test compiled these shapes


def test_augmult_batches_of_any_size_compile_the_step_once():
    x, y = _data()
    tr = _trainer(_poisson_plan())
    for n in (16, 0, 11, 30, 60):
        rows = np.arange(n)
        tr.dp_step(Batch(np.concatenate([x[rows], x[rows] + 0.1]), np.tile(y[rows], 2), np.tile(rows, 2),
                         np.full(2 * n, 0.5, np.float32)))
    assert tr.compilations() <= 1  # 0: an earlier test compiled these shapes


@pytest.mark.parametrize("unit", ["example", "patient"])
def test_several_chunks_equal_one_chunk_and_noise_is_added_once(unit):
    """The same DP step (same dp_seed: the same noise) over 1 chunk and over several chunks: equal parameters up
    to float summation order. Noise added per chunk, or a chunk's sum dropped, would differ by far more."""
    x, y = _data()
    units = np.arange(200) // 2 if unit == "patient" else np.arange(200)
    rows = np.flatnonzero(units < 30)
    batch = Batch(x[rows], y[rows], units[rows])
    out = []
    for max_physical, clipping in ((1024, "auto"), (8, "auto"), (8, "vmap")):
        tr = _trainer(_poisson_plan(unit=unit, units=100 if unit == "patient" else 200), max_physical, clipping)
        before = tr.flat_params()
        tr.dp_step(batch)
        tr.dp_step(batch)
        out.append(tr.flat_params())
        assert tr.compilations() <= 1  # 0: an earlier test compiled these shapes
    assert np.abs(out[0] - before).max() > 1e-2
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], out[0], rtol=1e-5, atol=1e-6)
