"""Ghost / book-keeping norms and clipped sums equal vmap per-example gradients, on every tapped layer.

Shapes are drawn by hypothesis; each layer is also run with the ghost and the direct method forced,
so both code paths are checked whatever the automatic choice would be. Per-unit clipping (several
rows per unit) is checked against vmap gradients summed per unit.

Row weights (``mask``) are drawn as 0/1, augmult-style 1/K, or arbitrary values in [0, 2] (zeros:
padding); the reference weights each row's loss once (vmap of ``w_i * loss_i``), so every layer path
must apply the weight exactly once, per example and per unit. Fixed-shape tests run every model with
unequal weights inside a unit, ghost and direct, per example and per unit.

Run time: compilation dominates (one XLA program per model, shapes and method), so the programs are
compiled with backend optimisation off and the fixed-shape tests share theirs.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptrain.models import flax_models as fm
from dptrain.trainers import fast_clip


class SequenceNet(nn.Module):
    """Every sequence layer at once: Embed -> LoRA (3-D) -> LayerNorm -> Dense (3-D) -> mean -> Dense (2-D)."""

    vocab: int
    features: int
    rank: int
    hidden: int

    @nn.compact
    def __call__(self, idx):
        h = fm.Embed(self.vocab, self.features)(idx)
        h = fm.LayerNorm()(jnp.tanh(fm.LoRADense(self.features, self.rank)(h)))
        h = jnp.tanh(fm.Dense(self.hidden)(h)).mean(1)
        return fm.Dense(3)(h)


class ConvNet(nn.Module):
    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: str
    groups: int

    @nn.compact
    def __call__(self, x):
        h = fm.Conv(self.features, self.kernel, self.strides, self.padding)(x)
        h = jnp.tanh(fm.GroupNorm(self.groups)(h))
        return fm.Dense(3)(h.mean((1, 2)))


class Mixed(nn.Module):
    """A plain flax Dense (no tap: vmap fallback) and a tapped Dense called twice (shared: fallback)."""

    @nn.compact
    def __call__(self, x):
        shared = fm.Dense(x.shape[-1])
        h = jnp.tanh(shared(jnp.tanh(shared(x))))
        return nn.Dense(3)(h)


Variant = tuple[str, bool]  # (layer method, per unit)
PER_ROW_AND_UNIT: tuple[Variant, ...] = (("ghost", False), ("direct", False), ("ghost", True), ("direct", True))


@functools.cache
def _program(model, variants: tuple[Variant, ...]):
    """One compiled program per (model, shapes, variants): the reference and the fast path side by side,
    for each (layer method, per unit) variant (several variants share the reference and one compilation).

    Reference: per-row gradients by ``jax.vmap(jax.grad(...))`` of the row's weighted loss (summed per
    unit), their norms, clip factors and the clipped sum, written here independently of ``fast_clip``."""

    def run(params, others, x, y, mask, seg):
        def apply_fn(p, xx):
            return model.apply({"params": p, **others}, xx)

        def loss_one(p, xi, yi, mi):
            return mi * fast_clip.cross_entropy(apply_fn(p, xi[None]), yi[None])[0]

        rows = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0, 0))(params, x, y, mask)
        ref_loss = jnp.sum(mask * fast_clip.cross_entropy(apply_fn(params, x), y))
        b = x.shape[0]
        out = []
        for layer_method, per_unit in variants:
            g = jax.tree.map(lambda v: jax.ops.segment_sum(v, seg, num_segments=b), rows) if per_unit else rows
            ref_norms = jnp.sqrt(sum(jnp.sum(jnp.square(v.reshape(b, -1)), 1) for v in jax.tree.leaves(g)))
            clip = jnp.median(ref_norms) + 1e-3  # some clipped, some not
            c = jnp.minimum(1.0, clip / (ref_norms + 1e-6))
            ref_sum = jax.tree.map(lambda v, c=c: jnp.tensordot(c, v, axes=1), g)
            units = fast_clip.Units(seg, b) if per_unit else None
            norms = fast_clip.unit_norms(apply_fn, params, x, y, mask, units=units, layer_method=layer_method)
            got_sum, loss = fast_clip.clipped_grad_sum(apply_fn, params, x, y, mask, clip=clip, units=units,
                                                       layer_method=layer_method)
            out.append((ref_norms, norms, ref_sum, got_sum, ref_loss, loss, clip))
        return out

    # tiny programs, many shapes: XLA's backend optimisation would take most of the test time
    return jax.jit(run, compiler_options={"xla_backend_optimization_level": 0})


def _weights(rng, b: int, kind: str) -> np.ndarray:
    """Row weights: ``binary`` 0/1; ``augmult`` 1/K (one K in 2..4) on real rows; ``random`` any value
    in [0, 2] per row; about one row in five is padding (weight 0) in all three."""
    real = rng.random(b) < 0.8
    w = {"binary": 1.0, "augmult": 1.0 / rng.integers(2, 5), "random": rng.uniform(0.0, 2.0, b)}[kind]
    return np.where(real, w, 0.0).astype(np.float32)


def _run(model, x, seed, variants: tuple[Variant, ...], units=None, weights="binary", mask=None):
    """The program's results (one tuple per variant) on random parameters, labels and row weights."""
    b = x.shape[0]
    rng = np.random.default_rng(seed)
    # random values everywhere (LoRA's B starts at zero, which would hide half the adapter's gradient);
    # shapes from an abstract init: no compilation
    shapes = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32), x)
    variables = jax.tree.map(lambda s: np.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
    params = variables.pop("params")
    y = jnp.asarray(rng.integers(0, 3, b))
    mask = jnp.asarray(_weights(rng, b, weights) if mask is None else np.asarray(mask, np.float32))
    seg = jnp.asarray(np.zeros(b, np.int32) if units is None else units)
    return _program(model, variants)(params, variables, x, y, mask, seg)


def _assert_matches(result):
    """Fast norms, clipped sum and loss equal the vmap reference; returns (clipped sum, clip, ref norms)."""
    ref_n, got_n, ref_sum, got_sum, ref_loss, loss, clip = result
    np.testing.assert_allclose(got_n, ref_n, rtol=2e-4, atol=1e-5)
    assert jax.tree.structure(got_sum) == jax.tree.structure(ref_sum)
    for r, g in zip(jax.tree.leaves(ref_sum), jax.tree.leaves(got_sum), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    return got_sum, float(clip), np.asarray(ref_n)


def _check(model, x, seed, layer_method="auto", units=None, weights="binary"):
    (result,) = _run(model, x, seed, ((layer_method, units is not None),), units, weights)
    _assert_matches(result)


methods = st.sampled_from(["auto", "ghost", "direct"])
weight_kinds = st.sampled_from(["random", "augmult", "binary"])  # hypothesis starts from the first


@settings(max_examples=4, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(1, 5), vocab=st.integers(2, 8), e=st.integers(1, 6), r=st.integers(1, 3),
       h=st.integers(1, 6), method=methods, per_unit=st.booleans(), weights=weight_kinds, seed=st.integers(0, 999))
def test_dense_sequence_embedding_lora_layernorm(b, t, vocab, e, r, h, method, per_unit, weights, seed):
    """Embedding (small vocab: repeated tokens), LoRA and Dense on sequences, Dense on 2-D inputs."""
    idx = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)
    units = np.random.default_rng(seed).integers(0, max(1, b // 2), b).astype(np.int32) if per_unit else None
    _check(SequenceNet(vocab, e, r, h), idx, seed, method, units, weights)


@settings(max_examples=3, deadline=None)
@given(b=st.integers(1, 4), hw=st.integers(3, 7), c=st.integers(1, 3), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 3), s=st.integers(1, 2), pad=st.sampled_from(["VALID", "SAME"]), method=methods,
       per_unit=st.booleans(), weights=weight_kinds, seed=st.integers(0, 999))
def test_conv_and_groupnorm(b, hw, c, groups, k, s, pad, method, per_unit, weights, seed):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, hw, hw + 1, c)), jnp.float32)
    units = np.random.default_rng(seed).integers(0, max(1, b // 2), b).astype(np.int32) if per_unit else None
    _check(ConvNet(2 * groups, (k, k), (s, s), pad, groups), x, seed, method, units, weights)


@settings(max_examples=3, deadline=None)
@given(b=st.integers(1, 6), d=st.integers(1, 6), h=st.integers(1, 6), method=methods, per_unit=st.booleans(),
       weights=weight_kinds, seed=st.integers(0, 999))
def test_dense_2d_mlp(b, d, h, method, per_unit, weights, seed):
    """2-D Dense layers (an MLP): per example the |a| |g| rule, per unit the B x B Gram (ghost) or
    the per-unit sum of per-row gradients (direct)."""
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, d)), jnp.float32)
    units = np.random.default_rng(seed).integers(0, max(1, b // 2), b).astype(np.int32) if per_unit else None
    _check(fm.MLP(d, 3, (h,)), x, seed, method, units, weights)


# Fixed shapes, every model, unequal weights: 0.3, 1.7, 0.5 on the rows of unit 0, augmult-style 1/3
# on the rows of unit 1, one padding row (its own unit).
UNEQUAL = np.array([0.3, 1.7, 0.5, 1 / 3, 1 / 3, 1 / 3, 0.0], np.float32)
UNEQUAL_UNITS = np.array([0, 0, 0, 1, 1, 1, 2], np.int32)
MODELS = ["sequence", "conv", "mlp", "fallback"]


def _fixed_model(name: str):
    """(model, x) with 7 rows; the sequence model has T = 3 (3-D Dense, LoRA, Embed, LayerNorm)."""
    rng = np.random.default_rng(7)
    b = len(UNEQUAL)
    if name == "sequence":
        return SequenceNet(5, 4, 2, 3), jnp.asarray(rng.integers(0, 5, (b, 3)), jnp.int32)
    if name == "conv":
        return ConvNet(2, (2, 2), (1, 1), "VALID", 1), jnp.asarray(rng.normal(size=(b, 4, 5, 2)), jnp.float32)
    if name == "mlp":
        return fm.MLP(4, 3, (5,)), jnp.asarray(rng.normal(size=(b, 4)), jnp.float32)
    return Mixed(), jnp.asarray(rng.normal(size=(b, 4)), jnp.float32)


MASKS = {"unequal": UNEQUAL,
         "one_unit": np.where(UNEQUAL_UNITS == 0, UNEQUAL, 0.0),  # only unit 0: 0.3, 1.7, 0.5
         "one_row": np.where(np.arange(len(UNEQUAL)) == 1, 1.7, 0.0)}  # only row 1: 1.7


@functools.cache
def _fixed_results(name: str, mask: str):
    """All four variants (ghost / direct, per example / per unit) of one model in one program (one
    compilation per model; the masks are data)."""
    model, x = _fixed_model(name)
    return _run(model, x, 3, PER_ROW_AND_UNIT, UNEQUAL_UNITS, mask=MASKS[mask])


@pytest.mark.parametrize("per_unit", [False, True], ids=["per_example", "per_unit"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("name", MODELS)
def test_unequal_row_weights_match_vmap(name, method, per_unit):
    """Weights unequal inside a unit, and 1/K weights, enter exactly once on every layer path (the
    vmap reference weights each row's loss once)."""
    _assert_matches(_fixed_results(name, "unequal")[PER_ROW_AND_UNIT.index((method, per_unit))])


@settings(max_examples=6, deadline=None)
@given(units=st.lists(st.integers(0, 3), min_size=7, max_size=7), weights=weight_kinds, seed=st.integers(0, 999))
def test_untapped_and_shared_layers_fall_back_to_vmap(units, weights, seed):
    """The fixed-shape fallback program again (no new compilation), other data, units and weights."""
    model, _ = _fixed_model("fallback")
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(len(UNEQUAL), 4)), jnp.float32)
    for result in _run(model, x, seed, PER_ROW_AND_UNIT, np.asarray(units, np.int32), weights):
        _assert_matches(result)


def _tree_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree.leaves(tree))))


@pytest.mark.parametrize("per_unit", [False, True], ids=["per_example", "per_unit"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("name", MODELS)
def test_one_unit_with_unequal_weights_contributes_norm_clip(name, method, per_unit):
    """Only one unit has weight -- per unit: unit 0, rows weighted 0.3, 1.7, 0.5; per example: row 1,
    weighted 1.7 -- so the clipped sum is that unit's contribution: its norm is C (<= C up to 1e-5
    relative; C is small enough that the unit is clipped). Same program as above: no new compilation."""
    got_sum, clip, ref_n = _assert_matches(
        _fixed_results(name, "one_unit" if per_unit else "one_row")[PER_ROW_AND_UNIT.index((method, per_unit))])
    assert ref_n.max() > 2 * clip  # the unit is clipped
    norm = _tree_norm(got_sum)
    assert norm <= clip * (1 + 1e-5), norm / clip
    np.testing.assert_allclose(norm, clip, rtol=1e-4)


def test_tapped_layers_cover_the_models_parameters():
    """In the built-in models every trainable parameter has a fast rule (no vmap fallback)."""
    for model, x in ((fm.MLP(6, 2, (8, 4)), jnp.zeros((3, 6))),
                     (fm.SmallCNN(), jnp.zeros((2, 28, 28, 1))),
                     (fm.LoRATransformer(vocab=16, seq_len=8, d_model=16, heads=2, mlp=32, rank=2),
                      jnp.zeros((2, 8), jnp.int32))):
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        tape = fast_clip._Tape()
        token = fast_clip._TAPE.set(tape)
        try:
            jax.eval_shape(lambda v, xx, m=model: m.apply(v, xx), variables, x)
        finally:
            fast_clip._TAPE.reset(token)
        covered = {p + (n,) for p, s in tape.specs.items() for n in s.params}
        from flax import traverse_util

        assert set(traverse_util.flatten_dict(variables["params"])) <= covered, type(model).__name__
