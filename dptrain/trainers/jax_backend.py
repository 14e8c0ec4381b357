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

Static shapes: one compiled step per run. The batch is laid out in chunks of a fixed number of rows per run
(masked padding rows fill the last chunk); the compiled step processes one chunk, adds its clipped (or plain)
gradient sum to an accumulator and, on the last chunk of a step (a traced flag, ``lax.cond``), adds the noise
and updates the parameters. So a step of K chunks is K calls of the same program (gradient accumulation; the
noise is still added once), and neither the batch size nor the number of chunks changes a shape.
  * rows per chunk (per example): ``min(max_physical_batch_size, cap)`` where cap is
    ``scheme.max_batch_size`` under ``TruncatedPoissonSampling`` (a larger batch is refused) and otherwise
    ``E + 4 sqrt(E) + 1`` rounded up to a multiple of 8 (E = the expected batch size): a Poisson batch above it
    (probability below 1e-4) takes a second chunk, not a new compilation. (A truncated-Poisson event would
    depend on the exact number of units, which is private, so ``PrivacyPlan.from_recipe`` builds plain Poisson.)
  * per unit (several rows per unit, e.g. augmentation multiplicity): rows are grouped by unit into chunks
    that never split a unit; rows per chunk are fixed at the first non-empty batch, from its rows per unit
    (cap or the bound above, in units, times rows per unit; at most ``max_physical_batch_size``). A later
    unit with more rows than that grows the chunk (one more compilation); more than
    ``max_physical_batch_size`` rows is refused.
The chunk size only changes the summation order (about 1e-7 relative), never the result otherwise.

Noise: ``jax.random`` with a key derived from ``(dp_seed, steps_done)`` (counter-based: resuming from a
checkpoint replays exactly); with ``secure_rng`` from the OS CSPRNG on the host (Box-Muller, four
Gaussians summed and halved, Opacus's floating-point attack mitigation), passed into the step.

Data parallelism (``JaxTrainer.num_devices``): with more than one local device (``jax.local_devices()``)
the step runs on a 1-D mesh with axis ``"data"``. Every padded batch array is laid out as
``(devices, chunks, rows per device, ...)`` and sharded along that leading axis
(``NamedSharding(mesh, PartitionSpec("data"))``); parameters, optimiser state, EMA, the noise key and
(``secure_rng``) the host noise are replicated. Each device clips and sums the units of its own rows; jit
(GSPMD) inserts the cross-device sum (an all-reduce), so the clipped sum runs over the whole global batch;
the noise is then drawn once from the replicated key (the same values on every device, and the same values
as on one device: threefry keys are counter-based and partitionable), added once, divided by the expected
batch size once. With one device there is no mesh and no sharding: the step is bit-for-bit the
single-device step.

Formal guarantees with several devices: those of ``dp_step`` above, unchanged. A privacy unit never spans
devices (per-unit chunks are assigned to devices whole), so each unit's summed gradient is clipped to C
exactly once; padding rows (the row count is rounded up to a multiple of the device count) are masked; the
sampler and ``TruncatedPoissonSampling.max_batch_size`` are untouched -- the accounted batch is the global
batch, so epsilon and the ledger do not depend on the number of devices.

Sharp edges (several devices):
  * results equal a one-device run only up to floating-point summation order (about 1e-7 relative per
    step), not bit for bit; the noise itself is identical.
  * ``max_physical_batch_size`` bounds the *global* rows per chunk: each device processes ``ceil(rows per
    chunk / devices)`` rows per call of the step (at least one row, and per unit at least the largest unit
    of the batch, up to ``max_physical_batch_size``). Padded row counts are rounded
    up to a multiple of the device count (more padding: more compute, no privacy effect); per unit, packing
    whole units into smaller per-device chunks can need more chunks than on one device.
  * ``predict`` runs replicated (every device computes every prediction); it is not sharded.
  * single host only: the mesh spans ``jax.local_devices()``; with ``jax.process_count() > 1`` each
    process would train its own model on its own batches.

Sharp edge: ``dp_seed`` is secret (it determines the noise); it is not part of ``state_dict``.

State (``state_dict``): numpy arrays and plain values only (what :mod:`dptrain.trainers.checkpoint` stores):
parameters and other collections keyed by flax path joined with "/", the optimiser state's leaves as a list
(``jax.tree.leaves`` order), the step counter and the EMA. This module never imports torch.
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
from flax import traverse_util
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dptrain.config import OptimizerConfig
from dptrain.trainers import fast_clip
from dptrain.trainers.base import Batch, StepStats, TrainerError, ema_decay_at
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import secure_normal

_CLIPPING = {"auto": "auto", "vmap": "vmap", "hooks": "auto", "ghost": "auto"}  # Opacus names accepted


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _to_numpy(x) -> np.ndarray:
    return np.array(x)  # a host copy (a replicated array is fully addressable)


def _from_numpy(a, like) -> jax.Array:
    if not isinstance(a, np.ndarray):
        raise TrainerError(f"load_state_dict: expected a numpy array, got {type(a).__name__}; give the state "
                           "that state_dict() or load_checkpoint() returned")
    if a.shape != tuple(np.shape(like)):
        raise TrainerError(f"load_state_dict: expected shape {tuple(np.shape(like))}, got {a.shape}")
    return jnp.asarray(a, dtype=like.dtype)


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
    mesh: Mesh | None = None  # several devices: batch arrays (D, K, m, ...) sharded along D


@functools.lru_cache(maxsize=16)
def _compiled_predict(model):
    def predict(params, others, x):
        return jax.nn.softmax(model.apply({"params": params, **others}, x).astype(jnp.float32), axis=-1)

    return jax.jit(predict)


@jax.jit
def _ema_update(ema, params, d):
    """One compiled EMA update (op by op it dispatches three programs per parameter array, every step)."""
    return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


@functools.lru_cache(maxsize=16)
def _compiled_step(cfg: StepConfig):
    """The jit-compiled step on one chunk: (params, others, opt_state, acc, loss_acc, x (M, ...), y, mask,
    seg | None, last, key_data | None, noise | None) -> (params, opt_state, acc, loss_acc). Adds the chunk's
    clipped (or plain) gradient sum to ``acc``; where ``last`` (traced), adds the noise, divides by the expected
    batch size, updates the parameters and returns a zero ``acc``. With ``cfg.mesh`` the batch arrays are
    (D, m, ...), sharded along D; everything else is replicated."""
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

    def finish(params, opt_state, grads, key_data, noise_flat):
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
        return optax.apply_updates(params, updates), opt_state, jax.tree.map(jnp.zeros_like, grads)

    def step(params, others, opt_state, acc, loss_acc, x, y, mask, seg, last, key_data, noise_flat):
        if cfg.mesh is None:
            grads, loss = chunk_grads(params, others, x, y, mask, seg)
        else:  # each device sums its own shard (leading axis D); the sum over D is GSPMD's all-reduce
            per_device = jax.vmap(chunk_grads, in_axes=(None, None, 0, 0, 0, 0))(params, others, x, y, mask, seg)
            per_device = jax.lax.with_sharding_constraint(per_device, NamedSharding(cfg.mesh, PartitionSpec("data")))
            grads, loss = jax.tree.map(lambda v: jnp.sum(v, axis=0), per_device)
        acc = jax.tree.map(jnp.add, acc, grads)
        params, opt_state, acc = jax.lax.cond(
            last, lambda a: finish(*a, key_data, noise_flat), lambda a: a, (params, opt_state, acc))
        return params, opt_state, acc, loss_acc + loss

    if cfg.mesh is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=NamedSharding(cfg.mesh, PartitionSpec()))


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
        if jax.process_count() > 1:
            raise TrainerError(f"trainer.backend: jax with {jax.process_count()} processes would train one model per "
                               "process; the JAX backend is data-parallel over one process's local devices only")
        devices = jax.local_devices()
        self.num_devices = len(devices)  # how many devices train (data parallel); the run record may report it
        self.mesh = Mesh(np.array(devices), ("data",)) if self.num_devices > 1 else None

    # ---- setup ----
    def init(self, model, plan: PrivacyPlan, *, seed: int, dp_seed: int, fix_batchnorm: bool = False,
             ema: float | None = None) -> None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise TrainerError("model: the jax backend expects a flax module from dptrain.models.flax_models "
                               "(it declares input_shape and input_dtype); got " + type(model).__name__)
        self.model, self.plan, self.dp_seed = model, plan, int(dp_seed)
        self.in_dtype = jnp.dtype(getattr(model, "input_dtype", "float32"))
        # one compiled program (op by op, flax's init compiles every primitive of the model separately)
        variables = dict(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *shape), self.in_dtype)))
        if "batch_stats" in variables:
            raise TrainerError(
                "model: BatchNorm cannot be trained with DP: it mixes statistics across the examples of a batch, "
                "so one example's gradient depends on the others and per-example clipping no longer bounds its "
                "influence. Use GroupNorm (dptrain.models.flax_models.GroupNorm) or LayerNorm"
                + (" (fix_batchnorm cannot rewrite a flax module)." if fix_batchnorm else "."))
        self.params = self._replicate(variables.pop("params", {}))
        self.others = self._replicate(variables)
        self.ema_decay = ema
        self.ema = jax.tree.map(jnp.copy, self.params) if ema else None
        o = self.opt_cfg
        self.opt_state = self._replicate(_optimizer(o).init(self.params))
        self.per_unit = plan.privacy_unit != "example"
        self.std = 0.0 if plan.mode != "dp" else float(plan.noise_multiplier) * float(plan.clipping_norm)
        self._n_params = int(sum(np.size(p) for p in jax.tree.leaves(self.params)))
        self._step = _compiled_step(StepConfig(
            model=model, optimizer=o, mode=plan.mode, clip=None if plan.clipping_norm is None else float(
                plan.clipping_norm), std=self.std, expected_batch_size=float(plan.expected_batch_size),
            clipping=self.clipping, mesh=self.mesh))
        self._predict = _compiled_predict(model)
        self._zero_acc = self._replicate((jax.tree.map(jnp.zeros_like, self.params), jnp.zeros((), jnp.float32)))
        self._chunk_rows: int | None = None  # rows per chunk (global), fixed at the first batch (module docstring)
        self._grouped = False  # the per-unit layout was used (an empty batch then keeps it: the same program)
        self._compiled_at_init = self._step._cache_size()

    def _replicate(self, tree):
        """Several devices: a copy of ``tree`` on every device of the mesh; one device: ``tree`` itself."""
        return tree if self.mesh is None else jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def apply_fn(self, params, x):
        return self.model.apply({"params": params, **self.others}, x)

    # ---- host side: static layout ----
    def _bound(self) -> int:
        """Units per step that a chunk is sized for: the truncation cap, or a Poisson bound (module docstring)."""
        cap = getattr(self.plan.scheme, "max_batch_size", None)
        if cap is not None:
            return int(cap)
        e = float(self.plan.expected_batch_size)
        return -(-math.ceil(e + 4 * math.sqrt(e) + 1) // 8) * 8

    def _layout(self, batch: Batch):
        """Row indices (D, K, m) into the batch (-1 = padding) and, per unit, chunk-local unit ids: D devices,
        K chunks per device (one call of the step each), m rows per device and chunk (fixed per run)."""
        n, d = len(batch), self.num_devices
        cap = getattr(self.plan.scheme, "max_batch_size", None)
        # per unit: also repeated units (augmentation multiplicity); an empty batch keeps the run's layout
        per_unit = self.per_unit or len(np.unique(batch.units)) < n or (n == 0 and self._grouped)
        if not per_unit or self.plan.mode == "non_private":
            if cap is not None and n > cap:
                raise TrainerError(f"batch: more rows than the plan's max_batch_size {cap}; the sampler truncates "
                                   "to it, so batches must come from the plan's sampler")
            if self._chunk_rows is None:
                self._chunk_rows = min(self.max_physical, self._bound())
            m = -(-self._chunk_rows // d)  # rows per device and chunk (global: m * d)
            k = max(1, math.ceil(n / (m * d)))
            slots = np.full((k * m, d), -1, dtype=np.int64)  # row i -> device i % d: real rows spread evenly
            slots.flat[:n] = np.arange(n)
            return slots.T.reshape(d, k, m), None
        self._grouped = True
        uniq, inverse = np.unique(batch.units, return_inverse=True)
        if cap is not None and len(uniq) > cap:
            raise TrainerError(f"batch: more units than the plan's max_batch_size {cap}")
        order = np.argsort(inverse, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1) if n else []
        largest = max((len(g) for g in groups), default=1)
        if largest > self.max_physical:
            raise TrainerError("batch: a sampled privacy unit has more rows than "
                               f"trainer.max_physical_batch_size={self.max_physical}; raise it")
        if self._chunk_rows is None:  # rows per unit from this batch (an empty batch: one)
            rows = -(-math.ceil((n / len(uniq) if n else 1) * self._bound()) // 8) * 8
            self._chunk_rows = min(self.max_physical, rows)
        m = -(-self._chunk_rows // d)  # per device; a unit never spans devices or chunks
        if largest > m:  # a larger unit than the chunk was sized for: grow it (one more compilation)
            m = min(self.max_physical, _pow2(largest))
            self._chunk_rows = m * d
        chunks: list[list[np.ndarray]] = []
        size = m
        for g in groups:
            if size + len(g) > m:
                chunks.append([])
                size = 0
            chunks[-1].append(g)
            size += len(g)
        k = max(-(-len(chunks) // d), 1)
        idx = np.full((k, d, m), -1, dtype=np.int64)  # chunk c -> device c % d, call c // d
        seg = np.zeros((k, d, m), dtype=np.int32)
        for c, gs in enumerate(chunks):
            rows = np.concatenate(gs)
            idx[c // d, c % d, :len(rows)] = rows
            seg[c // d, c % d, :len(rows)] = np.repeat(np.arange(len(gs)), [len(g) for g in gs])
        return idx.transpose(1, 0, 2), seg.transpose(1, 0, 2)

    def _noise_inputs(self):
        if self.std == 0 or not self.secure:
            state = np.random.SeedSequence([self.dp_seed, 5, self.steps_done]).generate_state(2, np.uint32)
            return self._replicate(jax.device_put(state)), None
        return self._replicate(jax.device_put((np.zeros(2, np.uint32),
                                               np.asarray(secure_normal(self._n_params), np.float32))))

    def _host_batch(self, batch: Batch):
        """(xs, ys, mask, seg | None) as numpy arrays: (K, M, ...) on one device; with several, (D, K, m, ...)."""
        idx, seg = self._layout(batch)
        if self.mesh is None:
            idx, seg = idx[0], None if seg is None else seg[0]
        safe = np.where(idx >= 0, idx, 0)
        mask = np.where(idx >= 0, batch.row_weights()[safe] if len(batch) else 0.0, 0.0)
        x, y = np.asarray(batch.x), np.asarray(batch.y)
        if len(batch):
            xs, ys = x[safe], y[safe]
        else:  # noise-only step: any finite input, fully masked
            xs = np.zeros((*idx.shape, *self.model.input_shape), self.in_dtype)
            ys = np.zeros(idx.shape, np.int32)
        return (np.asarray(xs, self.in_dtype), np.asarray(ys, np.int32), np.asarray(mask, np.float32),
                None if seg is None else np.asarray(seg, np.int32))

    def _put(self, arrays):
        if self.mesh is None:
            return tuple(None if a is None else jax.device_put(a) for a in arrays)  # (jnp.asarray compiles)
        return jax.device_put(arrays, NamedSharding(self.mesh, PartitionSpec("data")))

    def _device_batch(self, batch: Batch):
        """(xs, ys, mask, seg | None) on the device(s): (K, M, ...) on one device; with several, (D, K, m, ...)
        sharded along the leading axis D."""
        return self._put(self._host_batch(batch))

    def dp_step(self, batch: Batch) -> StepStats:
        arrays = self._host_batch(batch)
        axis = 0 if self.mesh is None else 1
        k = arrays[0].shape[axis]
        key, noise = self._noise_inputs()
        acc, loss = self._zero_acc
        for c in range(k):  # the same compiled program for every chunk (module docstring)
            chunk = self._put(tuple(None if a is None else np.take(a, c, axis=axis) for a in arrays))
            self.params, self.opt_state, acc, loss = self._step(
                self.params, self.others, self.opt_state, acc, loss, *chunk, np.asarray(c == k - 1), key, noise)
        self.steps_done += 1
        if self.ema is not None:  # post-processing of the released parameters: no privacy cost
            d = ema_decay_at(self.ema_decay, self.steps_done)
            self.ema = _ema_update(self.ema, self.params, np.float32(d))
        return StepStats(float(loss), float(batch.row_weights().sum()))

    def compilations(self) -> int:
        """Compilations of the step program since ``init`` (one per run, normally; none where a trainer of the same
        configuration in this process already compiled the same shapes: the jit function is shared)."""
        return self._step._cache_size() - self._compiled_at_init

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
        return {"/".join(k): _to_numpy(v) for k, v in traverse_util.flatten_dict(tree).items()}

    @staticmethod
    def _unflat(state: dict, like, what: str):
        flat = traverse_util.flatten_dict(like)
        keys = {"/".join(k): k for k in flat}
        if set(state) != set(keys):
            missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
            raise TrainerError(f"load_state_dict: {what} do not match the model (missing {missing[:3]}, "
                               f"unexpected {extra[:3]})")
        return traverse_util.unflatten_dict({k: _from_numpy(state[s], flat[k]) for s, k in keys.items()})

    def state_dict(self) -> dict:
        """Numpy arrays, dicts, lists and plain values only (see the module docstring)."""
        return {"backend": "jax", "params": self._flat(self.params),
                "collections": {c: self._flat(v) for c, v in self.others.items()},
                "optimizer": [_to_numpy(v) for v in jax.tree.leaves(self.opt_state)],
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
        self.opt_state = jax.tree.unflatten(tree, [_from_numpy(t, v) for t, v in
                                                   zip(state["optimizer"], leaves, strict=True)])
        self.steps_done = int(state["steps_done"])
        if self.ema is not None:
            if "ema" not in state:
                raise TrainerError("load_state_dict: the checkpoint has no EMA parameters but training.ema is set")
            self.ema = self._replicate(self._unflat(state["ema"], self.params, "EMA parameters"))
        self.params, self.others, self.opt_state = self._replicate((self.params, self.others, self.opt_state))

    def release_weights(self) -> dict[str, np.ndarray]:
        """The weights ``predict`` uses (the EMA parameters with ``ema``), float32 numpy arrays keyed by flax path
        joined with "/" (``Dense_0/kernel``); variables of other collections (none in the built-in models) as
        ``COLLECTION/path``. See :func:`dptrain.release.flax_weight_dict`."""
        from dptrain.release import flax_weight_dict

        return flax_weight_dict(self.params if self.ema is None else self.ema, self.others)

    def trained_model(self):
        """The flax module bound to the trained variables (live parameters, not the EMA)."""
        return self.model.bind({"params": self.params, **self.others})

    def num_trainable_parameters(self) -> int:
        return self._n_params

    def flat_params(self) -> np.ndarray:
        """All trainable parameters, flattened (``jax.flatten_util.ravel_pytree`` order)."""
        return np.asarray(ravel_pytree(self.params)[0])

