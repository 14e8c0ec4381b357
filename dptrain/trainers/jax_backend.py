"""The JAX backend: flax models, optax optimisers, one jit-compiled DP step.

Guarantees of ``dp_step`` (a DP run), identical to the Opacus backend's: each privacy unit's summed
gradient is clipped to L2 norm C, the clipped gradients are summed, Gaussian noise of std sigma*C is
added once per coordinate, and the result is divided by the *expected* batch size (never the realised
one). An empty batch still takes a noise-only step. ``mode='clip_only'`` clips without noise;
``mode='non_private'`` takes a plain gradient step (masked sum / expected batch size).

Clipping (``clipping``): ``auto`` -- ghost norms / book-keeping for the layers of
``dptrain.models.flax_models`` and vmap per-example gradients for any other parameter (see
``dptrain.trainers.fast_clip``); ``vmap`` -- vmap per-example gradients for everything. Per-unit
clipping (a patient with several rows) works in both.

Static shapes: the batch is padded with masked rows, so jit compiles once per shape:
  * per example, under ``TruncatedPoissonSampling`` (what ``PrivacyPlan.from_recipe`` builds for this
    backend): always ``scheme.max_batch_size`` rows, one compilation for the whole run; a larger batch
    is refused (the sampler truncates, so it never happens). Under a scheme without a maximum (plain
    Poisson, shuffled) the batch is padded to the next power of two (a few compilations).
  * per unit: rows are grouped by unit into chunks that never split a unit; the row count is padded
    to a power of two (at least ``max_batch_size`` when the scheme has one), chunks to a power of two.
Logical batches above ``max_physical_batch_size`` rows are processed in equal chunks by ``lax.scan``
inside the same compiled step (gradient accumulation; the noise is still added once).

Noise: ``jax.random`` with a key derived from ``(dp_seed, steps_done)`` (counter-based: resuming from a
checkpoint replays exactly); with ``secure_rng`` from the OS CSPRNG on the host (Box-Muller, four
Gaussians summed and halved, Opacus's floating-point attack mitigation), passed into the step.

Sharp edge: ``dp_seed`` is secret (it determines the noise); it is not part of ``state_dict``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from dptrain.config import OptimizerConfig
from dptrain.trainers import fast_clip
from dptrain.trainers.base import Batch, StepStats, TrainerError, ema_decay_at
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import secure_uniform

_CLIPPING = {"auto": "auto", "vmap": "vmap", "hooks": "auto", "ghost": "auto"}  # Opacus names accepted


def secure_normal(n: int) -> np.ndarray:
    """n standard Gaussians from os.urandom: Box-Muller, 4 draws summed and halved (std 1)."""
    u = secure_uniform(8 * n).reshape(4, 2, n) + 0.5 / (1 << 53)  # in (0, 1): log is finite
    z = np.sqrt(-2.0 * np.log(u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])
    return z.sum(0) / 2.0


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def _from_torch(t: torch.Tensor, like) -> jax.Array:
    arr = t.detach().cpu().numpy()
    if arr.shape != tuple(np.shape(like)):
        raise TrainerError(f"load_state_dict: expected shape {tuple(np.shape(like))}, got {arr.shape}")
    return jnp.asarray(arr, dtype=like.dtype)


def _optimizer(o: OptimizerConfig) -> optax.GradientTransformation:
    return optax.sgd(o.lr, momentum=o.momentum or None) if o.name == "sgd" else optax.adam(o.lr)


@dataclass(frozen=True)
class StepConfig:
    """Everything static about a step; equal configs share one jit function (and its compilations)."""

    model: Any
    optimizer: OptimizerConfig
    mode: str
    clip: float | None
    std: float
    expected_batch_size: float
    clipping: str


@functools.lru_cache(maxsize=16)
def _compiled_predict(model):
    def predict(params, others, x):
        return jax.nn.softmax(model.apply({"params": params, **others}, x).astype(jnp.float32), axis=-1)

    return jax.jit(predict)


@functools.lru_cache(maxsize=16)
def _compiled_step(cfg: StepConfig):
    """The jit-compiled DP step: (params, others, opt_state, xs (K, M, ...), ys, mask, seg | None,
    key_data | None, noise | None) -> (params, opt_state, loss_sum)."""
    tx = _optimizer(cfg.optimizer)

    def chunk_grads(params, others, x, y, mask, seg):
        def apply_fn(p, xx):
            return cfg.model.apply({"params": p, **others}, xx)

        if cfg.mode == "non_private":
            def loss(p):
                return jnp.sum(mask * fast_clip.cross_entropy(apply_fn(p, x), y))

            total, grads = jax.value_and_grad(loss)(params)
            return grads, total
        units = None if seg is None else fast_clip.Units(seg, x.shape[0])
        return fast_clip.clipped_grad_sum(apply_fn, params, x, y, mask, clip=cfg.clip, units=units,
                                          method=cfg.clipping)

    def step(params, others, opt_state, xs, ys, mask, seg, key_data, noise_flat):
        if xs.shape[0] == 1:
            grads, loss = chunk_grads(params, others, xs[0], ys[0], mask[0], None if seg is None else seg[0])
        else:
            def body(carry, inp):
                g, lsum = chunk_grads(params, others, *inp) if seg is not None else chunk_grads(
                    params, others, *inp, None)
                return (jax.tree.map(jnp.add, carry[0], g), carry[1] + lsum), None

            zero = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            inputs = (xs, ys, mask, seg) if seg is not None else (xs, ys, mask)
            (grads, loss), _ = jax.lax.scan(body, zero, inputs)
        if cfg.std > 0:
            if noise_flat is not None:
                noise = ravel_pytree(grads)[1](noise_flat * cfg.std)
            else:
                leaves, tree = jax.tree.flatten(grads)
                keys = jax.random.split(jax.random.wrap_key_data(key_data), len(leaves))
                noise = jax.tree.unflatten(tree, [cfg.std * jax.random.normal(k, v.shape, v.dtype)
                                                  for k, v in zip(keys, leaves, strict=True)])
            grads = jax.tree.map(jnp.add, grads, noise)
        grads = jax.tree.map(lambda g: g / cfg.expected_batch_size, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


class JaxTrainer:
    def __init__(self, optimizer: OptimizerConfig, *, clipping: str = "auto", max_physical_batch_size: int = 1024,
                 secure_rng: bool = False):
        if clipping not in _CLIPPING:
            raise TrainerError(f"trainer.clipping: expected 'auto' or 'vmap', got {clipping!r}")
        if max_physical_batch_size < 1:
            raise TrainerError(f"trainer.max_physical_batch_size: expected >= 1, got {max_physical_batch_size}")
        self.opt_cfg, self.clipping = optimizer, _CLIPPING[clipping]
        self.max_physical, self.secure = int(max_physical_batch_size), secure_rng
        self.steps_done = 0

    # ---- setup ----
    def init(self, model, plan: PrivacyPlan, *, seed: int, dp_seed: int, fix_batchnorm: bool = False,
             ema: float | None = None) -> None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise TrainerError("model: the jax backend expects a flax module from dptrain.models.flax_models "
                               "(it declares input_shape and input_dtype); got " + type(model).__name__)
        self.model, self.plan, self.dp_seed = model, plan, int(dp_seed)
        self.in_dtype = jnp.dtype(getattr(model, "input_dtype", "float32"))
        variables = dict(model.init(jax.random.key(seed), jnp.zeros((1, *shape), self.in_dtype)))
        if "batch_stats" in variables:
            raise TrainerError(
                "model: BatchNorm cannot be trained with DP: it mixes statistics across the examples of a batch, "
                "so one example's gradient depends on the others and per-example clipping no longer bounds its "
                "influence. Use GroupNorm (dptrain.models.flax_models.GroupNorm) or LayerNorm"
                + (" (fix_batchnorm cannot rewrite a flax module)." if fix_batchnorm else "."))
        self.params = variables.pop("params", {})
        self.others = variables
        self.ema_decay = ema
        self.ema = jax.tree.map(jnp.copy, self.params) if ema else None
        o = self.opt_cfg
        self.opt_state = _optimizer(o).init(self.params)
        self.per_unit = plan.privacy_unit != "example"
        self.std = 0.0 if plan.mode != "dp" else float(plan.noise_multiplier) * float(plan.clipping_norm)
        self._n_params = int(sum(np.size(p) for p in jax.tree.leaves(self.params)))
        self._step = _compiled_step(StepConfig(
            model=model, optimizer=o, mode=plan.mode, clip=None if plan.clipping_norm is None else float(
                plan.clipping_norm), std=self.std, expected_batch_size=float(plan.expected_batch_size),
            clipping=self.clipping))
        self._predict = _compiled_predict(model)

    def apply_fn(self, params, x):
        return self.model.apply({"params": params, **self.others}, x)

    # ---- host side: static layout ----
    def _layout(self, batch: Batch):
        """Row indices (K, M) into the batch (-1 = padding) and, per unit, chunk-local unit ids."""
        n = len(batch)
        cap = getattr(self.plan.scheme, "max_batch_size", None)
        per_unit = self.per_unit or len(np.unique(batch.units)) < n  # e.g. augmentation multiplicity
        if not per_unit or self.plan.mode == "non_private":
            if cap is not None and n > cap:
                raise TrainerError(f"batch: {n} rows exceed the plan's max_batch_size {cap}; the sampler truncates "
                                   "to it, so batches must come from the plan's sampler")
            total = cap if cap is not None else _pow2(n)
            m = min(self.max_physical, total)
            k = math.ceil(total / m)
            idx = np.full(k * m, -1, dtype=np.int64)
            idx[:n] = np.arange(n)
            return idx.reshape(k, m), None
        uniq, inverse = np.unique(batch.units, return_inverse=True)
        if cap is not None and len(uniq) > cap:
            raise TrainerError(f"batch: {len(uniq)} units exceed the plan's max_batch_size {cap}")
        m = min(self.max_physical, _pow2(max(n, cap or 1)))
        order = np.argsort(inverse, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1) if n else []
        chunks: list[list[np.ndarray]] = []
        size = m
        for g in groups:
            if len(g) > m:
                raise TrainerError(f"batch: one privacy unit has {len(g)} rows, more than "
                                   f"trainer.max_physical_batch_size={self.max_physical}; raise it")
            if size + len(g) > m:
                chunks.append([])
                size = 0
            chunks[-1].append(g)
            size += len(g)
        k = _pow2(max(len(chunks), 1))
        idx = np.full((k, m), -1, dtype=np.int64)
        seg = np.zeros((k, m), dtype=np.int32)
        for c, gs in enumerate(chunks):
            rows = np.concatenate(gs)
            idx[c, :len(rows)] = rows
            seg[c, :len(rows)] = np.repeat(np.arange(len(gs)), [len(g) for g in gs])
        return idx, seg

    def _noise_inputs(self):
        if self.std == 0 or not self.secure:
            state = np.random.SeedSequence([self.dp_seed, 5, self.steps_done]).generate_state(2, np.uint32)
            return jnp.asarray(state), None
        return jnp.zeros(2, jnp.uint32), jnp.asarray(secure_normal(self._n_params), jnp.float32)

    def dp_step(self, batch: Batch) -> StepStats:
        idx, seg = self._layout(batch)
        safe = np.where(idx >= 0, idx, 0)
        mask = np.where(idx >= 0, batch.row_weights()[safe] if len(batch) else 0.0, 0.0)
        x, y = np.asarray(batch.x), np.asarray(batch.y)
        if len(batch):
            xs, ys = x[safe], y[safe]
        else:  # noise-only step: any finite input, fully masked
            xs = np.zeros((*idx.shape, *self.model.input_shape), self.in_dtype)
            ys = np.zeros(idx.shape, np.int32)
        key, noise = self._noise_inputs()
        self.params, self.opt_state, loss = self._step(
            self.params, self.others, self.opt_state, jnp.asarray(xs, self.in_dtype), jnp.asarray(ys, jnp.int32),
            jnp.asarray(mask, jnp.float32), None if seg is None else jnp.asarray(seg), key, noise)
        self.steps_done += 1
        if self.ema is not None:  # post-processing of the released parameters: no privacy cost
            d = ema_decay_at(self.ema_decay, self.steps_done)
            self.ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, self.ema, self.params)
        return StepStats(float(loss), float(batch.row_weights().sum()))

    # ---- inference and state ----
    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        out = []
        for start in range(0, len(x), 4096):
            part = x[start:start + 4096]
            pad = _pow2(len(part)) - len(part)  # few shapes -> few compilations
            padded = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)]) if pad else part
            params = self.params if self.ema is None else self.ema
            out.append(np.asarray(self._predict(params, self.others, jnp.asarray(padded, self.in_dtype)))[: len(part)])
        if out:
            return np.concatenate(out)
        probe = jax.eval_shape(self._predict, self.params, self.others, jnp.zeros((1, *self.model.input_shape), self.in_dtype))
        return np.zeros((0, probe.shape[-1]), np.float32)

    @staticmethod
    def _flat(tree) -> dict[str, Any]:
        return {"/".join(k): _to_torch(v) for k, v in traverse_util.flatten_dict(tree).items()}

    @staticmethod
    def _unflat(state: dict, like, what: str):
        flat = traverse_util.flatten_dict(like)
        keys = {"/".join(k): k for k in flat}
        if set(state) != set(keys):
            missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
            raise TrainerError(f"load_state_dict: {what} do not match the model (missing {missing[:3]}, "
                               f"unexpected {extra[:3]})")
        return traverse_util.unflatten_dict({k: _from_torch(state[s], flat[k]) for s, k in keys.items()})

    def state_dict(self) -> dict:
        """Torch tensors, lists and plain values only (``torch.load(weights_only=True)`` loads it)."""
        return {"backend": "jax", "params": self._flat(self.params),
                "collections": {c: self._flat(v) for c, v in self.others.items()},
                "optimizer": [_to_torch(v) for v in jax.tree.leaves(self.opt_state)],
                "steps_done": self.steps_done, **({"ema": self._flat(self.ema)} if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend") != "jax":
            raise TrainerError(f"load_state_dict: checkpoint is from backend {state.get('backend', 'opacus')!r}, "
                               "not jax; resume with the backend that wrote it")
        self.params = self._unflat(state["params"], self.params, "parameters")
        self.others = {c: self._unflat(state["collections"][c], v, f"{c} variables") for c, v in self.others.items()}
        leaves, tree = jax.tree.flatten(self.opt_state)
        if len(state["optimizer"]) != len(leaves):
            raise TrainerError("load_state_dict: optimizer state does not match (another optimizer?)")
        self.opt_state = jax.tree.unflatten(tree, [_from_torch(t, v) for t, v in
                                                   zip(state["optimizer"], leaves, strict=True)])
        self.steps_done = int(state["steps_done"])
        if self.ema is not None:
            if "ema" not in state:
                raise TrainerError("load_state_dict: the checkpoint has no EMA parameters but training.ema is set")
            self.ema = self._unflat(state["ema"], self.params, "EMA parameters")

    def flat_params(self) -> np.ndarray:
        """All trainable parameters, flattened (``jax.flatten_util.ravel_pytree`` order)."""
        return np.asarray(ravel_pytree(self.params)[0])

