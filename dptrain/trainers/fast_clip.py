"""Per-example (or per-unit) clipped gradient sums in JAX, without materialising per-example gradients.

One forward and one backward pass give, for every *tapped* layer (the layers of
``dptrain.models.flax_models``: Dense, Conv, Embed, the scale/bias of GroupNorm/LayerNorm, and LoRA
adapters, which are two Dense layers), its input activations ``a`` and the gradient ``g`` of the loss
with respect to its output. The backward pass differentiates only with respect to zero "perturbations"
added to the tapped outputs, so it never computes a weight gradient. From ``a`` and ``g``:

* **norms** -- each unit's gradient norm, layer by layer, by the cheaper of
  - *ghost norms* (Li et al. 2022): for a Dense layer on a sequence of length T,
    ``|sum_t a_t g_t^T|^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)``: memory B T^2 (for T = 1 simply
    ``|a|^2 |g|^2``), chosen when ``2 T^2 < d_in d_out`` (Li et al.'s rule);
  - *direct* per-example gradients of that one layer, ``einsum(a, g)``: memory B d_in d_out, chosen
    otherwise. Convolutions are Dense layers on im2col patches (T = output pixels), so the rule picks
    per convolution. Embeddings use ``sum_{t,s} [i_t = i_s](g_t . g_s)`` (ghost) when ``T^2 < V`` and a
    per-example scatter otherwise. Norm-layer scale/bias gradients are tiny (B x C) and always direct.
* **clip factors** ``c = min(1, C / (norm + 1e-6))`` (Opacus's formula);
* **the clipped sum** in one extra contraction per layer (book-keeping, Bu et al. 2023):
  ``sum_i c_i a_i^T g_i``, or ``sum_i c_i G_i`` for layers whose per-example gradient G_i was
  materialised for its norm. There is no second backward pass.

Parameters of any other layer (a plain ``flax.linen.Dense``, a module called twice, a tapped layer
whose activations do not have the batch as leading axis) fall back to ``jax.vmap(jax.grad(...))``
per-example gradients of those parameters only. ``method="vmap"`` forces the fallback for everything.

Per-unit clipping (``units`` = per-row unit ids, a privacy unit being e.g. a patient with several rows):
the clip bounds the norm of the SUM of a unit's rows' gradients. Ghost norms generalise by treating a
unit's rows like a sequence: ``|sum_{i in u} a_i^T g_i|^2 = sum_{i,j in u} (a_i . a_j)(g_i . g_j)``;
this module uses it for 2-D Dense inputs (a B x B Gram masked to same-unit pairs) when
``B (d_in + d_out) < d_in d_out`` and otherwise sums the layer's per-row gradients per unit
(``segment_sum``) before taking norms -- still per layer, never the whole model's per-row gradients.
Embeddings per unit: a Gram over all tokens of the chunk masked to same-unit, same-token pairs when
``(B T)^2 < U V e``, else a per-unit scatter. Norm-layer grads and the vmap fallback: ``segment_sum``.

Row weights: ``mask`` is a weight w_i >= 0 per row (0 for padding, 1 for a real row, 1/K for each of K
augmented copies, anything nonnegative in general); a unit's gradient is ``sum_{i in u} w_i grad loss_i``.
The weight enters exactly once, as the loss cotangent of the one backward pass (``vjp(mask)``; the
vmap fallback's per-row loss is ``w_i loss_i``), so every ``g`` and every materialised per-row or
per-unit gradient already carries it. The clipped sum multiplies those by clip factors only (``c_u`` per
unit, ``c_u`` of the row's unit per row), never by the weight again.

Formal guarantees: with ``c`` computed from the exact per-unit norms, each unit's contribution to the
returned sum has L2 norm <= C (up to float rounding), whatever the method of each layer and whatever
the weights. Rows with ``mask = 0`` contribute nothing (their loss cotangent is zero, so their ``g`` is
zero).

Warning (sharp edge): the tap rules are exact only because each tapped parameter enters the loss only
through its layer's output, and the model never mixes examples (no BatchNorm). Models built from
other modules still train correctly through the vmap fallback, just more slowly.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

Path = tuple[str, ...]
Method = Literal["auto", "vmap"]
LayerMethod = Literal["auto", "ghost", "direct"]
EPS = 1e-6  # clip factor C / (norm + EPS), as Opacus


# ----------------------------------------------------------------------------------------------------
# taps: how layers report their activations during a fast-clipping forward pass
# ----------------------------------------------------------------------------------------------------


@dataclass
class LayerSpec:
    kind: str  # "dense" | "conv" | "embed" | "affine"
    params: tuple[str, ...]  # names of the parameters of this layer covered by the rule
    static: dict[str, Any] = field(default_factory=dict)


class _Tape:
    """Records taps during one traced forward pass (``perts`` None: shape pass; else record pass)."""

    def __init__(self, perts: dict[Path, jax.Array] | None = None):
        self.perts = perts
        self.specs: dict[Path, LayerSpec] = {}
        self.out_shapes: dict[Path, jax.ShapeDtypeStruct] = {}
        self.acts: dict[Path, tuple[jax.Array, ...]] = {}
        self.calls: Counter[Path] = Counter()


_TAPE: contextvars.ContextVar[_Tape | None] = contextvars.ContextVar("dptrain_fast_clip_tape", default=None)


def tap(module, kind: str, out: jax.Array, inputs: tuple[jax.Array, ...], params: tuple[str, ...],
        **static) -> jax.Array:
    """Called by a layer on its output. Outside a fast-clipping pass it returns ``out`` unchanged."""
    tape = _TAPE.get()
    if tape is None:
        return out
    path = tuple(module.path)
    tape.calls[path] += 1
    if tape.perts is None:
        tape.specs[path] = LayerSpec(kind, tuple(params), dict(static))
        tape.out_shapes[path] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out
    if path not in tape.perts:
        return out
    tape.acts[path] = tuple(inputs)
    return out + tape.perts[path]


# ----------------------------------------------------------------------------------------------------
# layer rules: norms^2 per row (or per unit) and the clipped sum
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """Per-row unit ids in [0, num) (rows of one unit are clipped together)."""

    seg: jax.Array
    num: int

    def sum(self, per_row: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(per_row, self.seg, num_segments=self.num)


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def _linear_method(b: int, t: int, d: int, e: int, units: Units | None, force: LayerMethod) -> str:
    if units is None:
        if t == 1:
            return "outer"
        if force != "auto":
            return force
        return "ghost" if 2 * t * t < d * e else "direct"
    if t == 1 and (force == "ghost" or (force == "auto" and b * (d + e) < d * e)):
        return "ghost"
    return "direct"


def _linear_norm2(a, g, units: Units | None, force: LayerMethod, a_sub: str = "btd"):
    """a: (B, T, d) (``a_sub="btd"``) or (B, d, T) (``"bdt"``: conv patches, feature-major), g: (B, T, e).
    Returns (norm^2 per row or unit, state for the clipped sum)."""
    b, e = g.shape[0], g.shape[-1]
    t = g.shape[1]
    d = a.shape[1] * a.shape[2] // t
    how = _linear_method(b, t, d, e, units, force)
    if how == "outer":  # T = 1, per example
        return _sq(a) * _sq(g), (how, None)
    if how == "ghost" and units is None:
        ka = jnp.einsum(f"{a_sub},{a_sub.replace('t', 's')}->bts", a, a)
        kg = jnp.einsum("bte,bse->bts", g, g)
        return jnp.sum(ka * kg, axis=(1, 2)), (how, None)
    if how == "ghost":  # per unit, T = 1: Gram over same-unit row pairs
        a2, g2 = a.reshape(b, d), g[:, 0]
        same = units.seg[:, None] == units.seg[None, :]
        k = jnp.where(same, (a2 @ a2.T) * (g2 @ g2.T), 0.0)
        return units.sum(jnp.sum(k, axis=1)), (how, None)
    w = jnp.einsum(f"{a_sub},bte->bde", a, g)
    if units is not None:
        w = units.sum(w)
    return _sq(w), (how, w)


def _linear_clipped(a, g, state, c_unit, c_row, a_sub: str = "btd"):
    how, w = state
    if how == "direct":
        return jnp.einsum("u,ude->de", c_unit, w)
    return jnp.einsum(f"{a_sub},bte->de", a, g * c_row[:, None, None])


def _bias_grads(g, units):
    gb = jnp.sum(g, axis=1)  # (B, e)
    return gb if units is None else units.sum(gb)


class _Rule:
    """norm2() -> (B,) or (U,); clipped(c_unit, c_row) -> {param name: summed clipped grad}."""

    def norm2(self) -> jax.Array:
        raise NotImplementedError

    def clipped(self, c_unit, c_row) -> dict[str, jax.Array]:
        raise NotImplementedError


class _DenseRule(_Rule):
    a_sub = "btd"  # layout of self.a (see _linear_norm2)

    def __init__(self, a, g, spec: LayerSpec, units, force, kernel_shape):
        b = a.shape[0]
        self.a, self.g = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        self.units, self.force, self.kernel_shape = units, force, kernel_shape
        self.has_bias = "bias" in spec.params

    def norm2(self):
        n2, self.state = _linear_norm2(self.a, self.g, self.units, self.force, a_sub=self.a_sub)
        if self.has_bias:
            self.gb = _bias_grads(self.g, self.units)
            n2 = n2 + _sq(self.gb)
        return n2

    def clipped(self, c_unit, c_row):
        out = {"kernel": _linear_clipped(self.a, self.g, self.state, c_unit, c_row, a_sub=self.a_sub).reshape(
            self.kernel_shape)}  # a conv's (kh kw C, O) is HWIO
        if self.has_bias:
            out["bias"] = jnp.einsum("u,ue->e", c_unit, self.gb)
        return out


def conv_patches(x, kernel_size, strides, padding) -> jax.Array:
    """im2col of an NHWC input, feature-major: (B, kh * kw * C, Ho * Wo), features in (i, j, c) order, so that a
    conv equals ``einsum("bkt,ko->bto", patches, kernel.reshape(-1, O))`` for an HWIO kernel. Strided slices of
    the channel-major input stacked along a major axis (contiguous copies: much faster in XLA on CPU than
    ``conv_general_dilated_patches``, itself a convolution, or a channels-last concatenation)."""
    b, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel_size, strides
    pads = lax.padtype_to_pads((h, w), kernel_size, strides, padding) if isinstance(padding, str) else padding
    xt = jnp.pad(jnp.transpose(x, (0, 3, 1, 2)), ((0, 0), (0, 0), *[tuple(p) for p in pads]))
    ho, wo = (xt.shape[2] - kh) // sh + 1, (xt.shape[3] - kw) // sw + 1
    cols = [lax.slice(xt, (0, 0, i, j), (b, c, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1), (1, 1, sh, sw))
            for i in range(kh) for j in range(kw)]
    return jnp.stack(cols, 1).reshape(b, kh * kw * c, ho * wo)


class _ConvRule(_DenseRule):
    """A convolution is a Dense layer on im2col patches; the sequence is the output pixels. The patches are
    feature-major (B, kh kw C, T) (see ``conv_patches``); g is (B, Ho, Wo, O) -> (B, T, O)."""

    a_sub = "bdt"

    def __init__(self, x, g, spec: LayerSpec, units, force, kernel_shape):
        s = spec.static  # (B, K, T) patches keep their shape in _DenseRule's reshape
        super().__init__(conv_patches(x, s["kernel_size"], s["strides"], s["padding"]), g, spec, units, force,
                         kernel_shape)


class _EmbedRule(_Rule):
    def __init__(self, idx, g, spec: LayerSpec, units, force, table_shape):
        b = idx.shape[0]
        self.idx, self.g = idx.reshape(b, -1), g.reshape(b, -1, g.shape[-1])
        self.units, self.force, self.vocab = units, force, table_shape[0]

    def norm2(self):
        b, t = self.idx.shape
        e = self.g.shape[-1]
        u = self.units
        if u is None:
            ghost = t == 1 or (self.force == "ghost" or (self.force == "auto" and t * t < self.vocab))
        else:
            ghost = self.force == "ghost" or (self.force == "auto" and (b * t) ** 2 < u.num * self.vocab * e)
        self.how = "ghost" if ghost else "direct"
        if ghost and u is None:
            same = self.idx[:, :, None] == self.idx[:, None, :]
            kg = jnp.einsum("bte,bse->bts", self.g, self.g)
            return jnp.sum(jnp.where(same, kg, 0.0), axis=(1, 2))
        if ghost:  # per unit: all tokens of a unit form one sequence
            tok_unit = jnp.repeat(u.seg, t)
            idx, g = self.idx.reshape(-1), self.g.reshape(-1, e)
            same = (tok_unit[:, None] == tok_unit[None, :]) & (idx[:, None] == idx[None, :])
            return u.sum(jnp.sum(jnp.where(same, g @ g.T, 0.0), axis=1).reshape(b, t).sum(1))
        rows = jnp.broadcast_to(jnp.arange(b)[:, None] if u is None else u.seg[:, None], self.idx.shape)
        w = jnp.zeros((b if u is None else u.num, self.vocab, e), self.g.dtype).at[rows, self.idx].add(self.g)
        self.w = w
        return _sq(w)

    def clipped(self, c_unit, c_row):
        if self.how == "direct":
            return {"embedding": jnp.einsum("u,uve->ve", c_unit, self.w)}
        g = self.g * c_row[:, None, None]
        return {"embedding": jnp.zeros((self.vocab, g.shape[-1]), g.dtype).at[self.idx].add(g)}


class _AffineRule(_Rule):
    """Scale/bias of a norm layer: y = xhat * scale + bias (per-example grads are B x C: materialise)."""

    def __init__(self, xhat, g, spec: LayerSpec, units, force, _shape):
        axes = tuple(range(1, g.ndim - 1))
        self.grads = {}
        if "scale" in spec.params:
            self.grads["scale"] = jnp.sum(xhat * g, axis=axes)
        if "bias" in spec.params:
            self.grads["bias"] = jnp.sum(g, axis=axes)
        if units is not None:
            self.grads = {k: units.sum(v) for k, v in self.grads.items()}

    def norm2(self):
        return sum(_sq(v) for v in self.grads.values())

    def clipped(self, c_unit, c_row):
        return {k: jnp.einsum("u,uc->c", c_unit, v) for k, v in self.grads.items()}


def _shapes_match(spec: LayerSpec, x, g, shapes: dict[str, tuple[int, ...]]) -> bool:
    """The parameter shapes are what the rule assumes (else the rule does not apply)."""
    e = g.shape[-1]
    bias_ok = shapes.get("bias", (e,)) == (e,)
    if spec.kind == "dense":
        return shapes["kernel"] == (x.shape[-1], e) and bias_ok
    if spec.kind == "conv":
        return shapes["kernel"] == (*spec.static["kernel_size"], x.shape[-1], e) and bias_ok and x.ndim == 4
    if spec.kind == "embed":
        return len(shapes["embedding"]) == 2 and shapes["embedding"][1] == e and jnp.issubdtype(x.dtype, jnp.integer)
    return x.shape == g.shape and all(s == (e,) for s in shapes.values())


_RULES = {"dense": _DenseRule, "conv": _ConvRule, "embed": _EmbedRule, "affine": _AffineRule}
_MAIN_PARAM = {"dense": "kernel", "conv": "kernel", "embed": "embedding", "affine": None}


# ----------------------------------------------------------------------------------------------------
# the passes
# ----------------------------------------------------------------------------------------------------

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def _per_row_grads(apply_fn: ApplyFn, params, sub: dict[Path, jax.Array], x, y, mask):
    """Per-row (masked) losses and gradients (vmap) of the parameters in ``sub`` (flat dict), the
    others held fixed."""
    flat = traverse_util.flatten_dict(params)

    def loss_one(s, xi, yi, mi):
        merged = traverse_util.unflatten_dict({**flat, **s})
        return mi * cross_entropy(apply_fn(merged, xi[None]), yi[None])[0]

    return jax.vmap(jax.value_and_grad(loss_one), in_axes=(None, 0, 0, 0))(sub, x, y, mask)


@dataclass
class _Pass:
    """Result of one pass: norms^2 per row/unit and how to form the clipped sum from clip factors."""

    norm2: jax.Array
    loss_sum: jax.Array
    clipped: Callable[[jax.Array, jax.Array], dict[Path, jax.Array]]


def _vmap_pass(apply_fn, params, x, y, mask, units: Units | None, names: list[Path] | None = None) -> _Pass:
    flat = traverse_util.flatten_dict(params)
    sub = {k: flat[k] for k in (names if names is not None else flat)}
    losses, grads = _per_row_grads(apply_fn, params, sub, x, y, mask)
    if units is not None:
        grads = {k: units.sum(v) for k, v in grads.items()}
    n2 = sum((_sq(v) for v in grads.values()), jnp.zeros(mask.shape[0] if units is None else units.num))

    def clipped(c_unit, c_row):
        return {k: jnp.tensordot(c_unit, v, axes=1) for k, v in grads.items()}

    return _Pass(n2, jnp.sum(losses), clipped)


def _fast_pass(apply_fn, params, x, y, mask, units: Units | None, force: LayerMethod) -> _Pass:
    flat = traverse_util.flatten_dict(params)

    # 1) shape pass (abstract, free): which layers tap, and their output shapes
    shape_tape = _Tape()

    def shapes():
        token = _TAPE.set(shape_tape)
        try:
            return apply_fn(params, x)
        finally:
            _TAPE.reset(token)

    jax.eval_shape(shapes)
    b = x.shape[0]
    usable: dict[Path, LayerSpec] = {}
    for path, spec in shape_tape.specs.items():
        owned = [path + (n,) for n in spec.params]
        if shape_tape.calls[path] != 1 or not all(k in flat for k in owned):
            continue  # shared or frozen layer: not a rule (shared params fall back to vmap)
        if not shape_tape.out_shapes[path].shape or shape_tape.out_shapes[path].shape[0] != b:
            continue
        usable[path] = spec
    perts = {p: jnp.zeros(shape_tape.out_shapes[p].shape, shape_tape.out_shapes[p].dtype) for p in usable}

    # 2) one forward + one backward w.r.t. the perturbations only (no weight gradients)
    def forward(pt):
        tape = _Tape(pt)
        token = _TAPE.set(tape)
        try:
            losses = cross_entropy(apply_fn(params, x), y)
        finally:
            _TAPE.reset(token)
        return losses, tape.acts

    losses, vjp, acts = jax.vjp(forward, perts, has_aux=True)
    (gouts,) = vjp(mask.astype(losses.dtype))

    rules: dict[Path, _Rule] = {}
    for path, spec in usable.items():
        inputs = acts[path]
        if any(getattr(t, "ndim", 0) == 0 or t.shape[0] != b for t in inputs):
            continue
        if not _shapes_match(spec, inputs[0], gouts[path], {n: flat[path + (n,)].shape for n in spec.params}):
            continue  # e.g. a tapped layer inside a lifted transform: leave it to the vmap fallback
        main = _MAIN_PARAM[spec.kind]
        shape = flat[path + (main,)].shape if main else None
        rules[path] = _RULES[spec.kind](inputs[0], gouts[path], spec, units, force, shape)
    covered = {path + (n,) for path, r in rules.items() for n in usable[path].params}
    rest = [k for k in flat if k not in covered]

    n_out = b if units is None else units.num
    n2 = jnp.zeros(n_out, jnp.float32)
    for r in rules.values():
        n2 = n2 + r.norm2()
    fallback = _vmap_pass(apply_fn, params, x, y, mask, units, rest) if rest else None
    if fallback is not None:
        n2 = n2 + fallback.norm2

    def clipped(c_unit, c_row):
        out: dict[Path, jax.Array] = {}
        for path, r in rules.items():
            out.update({path + (k,): v for k, v in r.clipped(c_unit, c_row).items()})
        if fallback is not None:
            out.update(fallback.clipped(c_unit, c_row))
        return out

    return _Pass(n2, jnp.sum(mask * losses), clipped)


def _run_pass(apply_fn, params, x, y, mask, units, method: Method, force: LayerMethod) -> _Pass:
    if method == "vmap":
        return _vmap_pass(apply_fn, params, x, y, mask, units)
    if method != "auto":
        raise ValueError(f"clipping: expected 'auto' or 'vmap', got {method!r}")
    return _fast_pass(apply_fn, params, x, y, mask, units, force)


def unit_norms(apply_fn: ApplyFn, params, x, y, mask, *, units: Units | None = None, method: Method = "auto",
               layer_method: LayerMethod = "auto") -> jax.Array:
    """Gradient L2 norm of each row's (or unit's) summed cross-entropy loss (for tests and diagnostics).

    Sharp edge: these are per-example values; never log them (DESIGN invariant 4)."""
    return jnp.sqrt(_run_pass(apply_fn, params, x, y, mask, units, method, layer_method).norm2)


def clipped_grad_sum(apply_fn: ApplyFn, params, x, y, mask, *, clip: float, units: Units | None = None,
                     method: Method = "auto", layer_method: LayerMethod = "auto"):
    """Sum over rows (or units) of gradients clipped to L2 norm ``clip``, and the weighted loss sum.

    ``apply_fn(params, x) -> logits``; ``mask`` (B,) is each row's loss weight (1 for real rows, 0 for
    padding, 1/K for augmult copies; any value >= 0); ``units`` groups rows into privacy units (None: each
    row is its own unit). Each unit's gradient ``sum_{i in u} mask_i grad loss_i`` is clipped to
    ``clip``. Returns ``(grads like params, loss_sum)``.
    """
    p = _run_pass(apply_fn, params, x, y, mask, units, method, layer_method)
    c_unit = jnp.minimum(1.0, clip / (jnp.sqrt(p.norm2) + EPS))
    # The pass's gradients (g, per-row / per-unit grads) already carry the weights (the loss cotangent is
    # ``mask``): multiply by clip factors only. Padding rows have g = 0, whatever their factor.
    c_row = c_unit if units is None else c_unit[units.seg]
    flat = p.clipped(c_unit, c_row)
    return traverse_util.unflatten_dict(flat), p.loss_sum
