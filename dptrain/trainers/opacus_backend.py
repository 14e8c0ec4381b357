"""The Opacus backend: per-example (or per-unit) clipping with Opacus, fed by dptrain's sampler.

Guarantees of ``dp_step`` (a DP run): each privacy unit's summed gradient is clipped to L2 norm C,
clipped gradients are summed, Gaussian noise of std sigma*C is added once, and the result is divided
by the *expected* batch size (never the realised one). An empty batch still takes a noise-only step.
Logical batches larger than ``max_physical_batch_size`` are processed in chunks (virtual steps)
that never split a unit. ``grad_sample_mode``: ``hooks`` (per-sample gradients via module hooks,
supports per-patient units), ``ghost`` (ghost clipping: norms without per-sample gradients;
per-example units only) or ``auto`` (:func:`choose_grad_sample_mode`: a rule on the model's layer shapes,
resolved with :meth:`OpacusTrainer.resolve_mode` before ``init``; both modes clip each example exactly, so the
choice changes speed and memory, never the guarantee).

What a row is and its loss come from a ``task``: ``ClassificationTask`` (features -> class logits,
cross-entropy) by default; ``dptrain.synth.lm.PrefixLMTask`` for causal LMs (token ids -> summed
next-token loss of the row's text). Clipping, noise and normalisation do not depend on the task.
Models with frozen parameters (LoRA adapters on a frozen LM) checkpoint only the trainable ones.

Noise comes from a torch generator reseeded each step from the secret ``dp_seed`` (resumable), or
with ``secure_rng`` from the OS CSPRNG (sum of four Gaussians / 2, Opacus's floating-point attack
mitigation).

Data-parallel (``dist``, see :mod:`dptrain.trainers.distributed`): ``dp_step`` gets the *global* batch on
every rank and processes only this rank's share (units ``u % world_size == rank``); the clipped sums are
all-reduced and the identical noise is added once, in ``add_noise``; the step equals the single-process one.

State (``state_dict``): numpy arrays and plain values only (what :mod:`dptrain.trainers.checkpoint` stores,
no pickle): the module's tensors, the torch optimiser's state with its per-parameter entries keyed by the
parameter index as a string, the step counter and the EMA. Sharp edge: bfloat16 tensors (numpy has no such
dtype) are stored widened to float32, exactly, and cast back to the parameter's dtype on load.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from dptrain.config import OptimizerConfig
from dptrain.trainers.base import Batch, StepStats, TrainerError, ema_decay_at
from dptrain.trainers.context import LOCAL, ProcessContext
from dptrain.trainers.devices import resolve_device
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import secure_normal

# Opacus's hooks fire on module outputs when inputs need no grad; harmless and expected here.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def secure_gaussian(shape: torch.Size, std: float, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise from os.urandom via Box-Muller, summed 4x and halved (same std)."""
    n = int(np.prod(shape)) if len(shape) else 1
    return torch.from_numpy(secure_normal(n) * std).reshape(shape).to(dtype)


class _OurNoise:
    """Mixin replacing Opacus's ``add_noise`` with our noise source (same std: sigma * C).

    Distributed, this is also where gradients are synchronised (no DDP gradient hook does it): ``sync_fn``
    all-reduces (SUM) every rank's clipped sum, then ``noise_fn`` -- identical on every rank -- adds the
    noise once, so the noisy sum is the single-process one (not sqrt(world_size) times the noise)."""

    noise_fn = None  # (clipped sums, std) -> one noise tensor per sum
    sync_fn = None  # in-place SUM across ranks; None in a single process

    def add_noise(self):
        std = self.noise_multiplier * self.max_grad_norm
        sums = [p.summed_grad for p in self.params]
        for s in sums:
            _check_processed_flag(s)
        if self.sync_fn is not None:
            self.sync_fn(sums)
        for p, s, z in zip(self.params, sums, self.noise_fn(sums, std), strict=True):
            p.grad = (s + z).view_as(p)
            _mark_as_processed(p.summed_grad)


class _DPOptimizer(_OurNoise, DPOptimizer):
    pass


class _DPOptimizerGhost(_OurNoise, DPOptimizerFastGradientClipping):
    pass


def _to(obj, device: torch.device):
    return tuple(_to(o, device) for o in obj) if isinstance(obj, tuple) else obj.to(device, non_blocking=True)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host copy as numpy; bfloat16 (no numpy dtype) widened to float32, exactly."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def _to_torch(a: Any) -> torch.Tensor:
    if not isinstance(a, np.ndarray):
        raise TrainerError(f"load_state_dict: expected a numpy array, got {type(a).__name__}; give the state "
                           "that state_dict() or load_checkpoint() returned")
    return torch.from_numpy(np.array(a))  # a copy: never aliases the caller's array


def _optimizer_state(sd: dict) -> dict[str, Any]:
    """A torch optimiser's ``state_dict`` in checkpointable form: per-parameter state keyed by str(index),
    tensors as numpy arrays, param_groups as they are (plain values)."""
    conv = lambda v: _to_numpy(v) if torch.is_tensor(v) else copy.deepcopy(v)  # noqa: E731
    return {"state": {str(i): {k: conv(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": [{k: conv(v) for k, v in g.items()} for g in sd["param_groups"]]}


def _torch_optimizer_state(state: dict) -> dict[str, Any]:
    """The inverse of :func:`_optimizer_state` (what ``torch.optim.Optimizer.load_state_dict`` takes)."""
    conv = lambda v: _to_torch(v) if isinstance(v, np.ndarray) else copy.deepcopy(v)  # noqa: E731
    try:
        return {"state": {int(i): {k: conv(v) for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": [{k: conv(v) for k, v in g.items()} for g in state["param_groups"]]}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TrainerError("load_state_dict: the optimizer state is malformed; resume from the checkpoint the "
                           "run wrote") from None


def check_model(model: nn.Module, *, fix: bool) -> nn.Module:
    """Refuse (or fix) modules Opacus cannot train privately, with a message that teaches."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and not fix:
        raise TrainerError(
            "model: BatchNorm cannot be trained with DP: it mixes statistics across the examples of a batch, "
            "so one example's gradient depends on the others and per-example clipping no longer bounds its "
            "influence. Use GroupNorm (or LayerNorm), or set model.fix_batchnorm: true to replace it.")
    if fix:
        model = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise TrainerError(f"model: Opacus cannot compute per-example gradients for it: {errors[0]}")
    return model


def choose_grad_sample_mode(model: nn.Module, example: torch.Tensor) -> tuple[str, str]:
    """``(mode, reason)``: ghost clipping when it is cheaper than per-sample gradients, else hooks.

    The rule of mixed ghost clipping (Bu et al. 2022, "Scalable and efficient training of large convolutional
    neural networks with differential privacy"): for a trainable linear or convolution layer with a weight of
    ``p x d`` (conv: ``C_out x C_in k^2``) applied at ``T`` positions (tokens, output pixels), a per-sample
    gradient holds ``p d`` numbers per example while the ghost norm costs about ``2 T^2``. Summed over the
    layers (Opacus picks one mode per model), ghost wins when ``sum 2 T^2 < sum p d``: MLPs (T = 1) take ghost,
    convolution nets (T = output pixels) and short-sequence LoRA layers take hooks. ``example``: one input row."""
    shapes: list[tuple[int, int]] = []

    def hook(mod, inp, out):
        if not (getattr(mod, "weight", None) is not None and mod.weight.requires_grad):
            return
        positions = out[0, 0].numel() if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d) else (
            out.numel() // max(1, out.shape[0]) // max(1, out.shape[-1]))
        shapes.append((int(positions), int(mod.weight.numel())))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    ghost_cost, hooks_cost = sum(2 * t * t for t, _ in shapes), sum(pd for _, pd in shapes)
    mode = "ghost" if shapes and ghost_cost < hooks_cost else "hooks"
    return mode, (f"auto: {mode} (sum over {len(shapes)} layers of 2 T^2 = {ghost_cost} vs per-sample gradient size "
                  f"{hooks_cost})")


class ClassificationTask:
    """Rows are feature vectors (float), targets class indices; per-row loss = cross-entropy."""

    def tensors(self, x: np.ndarray, y: np.ndarray):
        return torch.from_numpy(x).float(), torch.from_numpy(y).long()

    def per_row_loss(self, model: nn.Module, x, y) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, reduction="none")


class OpacusTrainer:
    def __init__(self, optimizer: OptimizerConfig, *, grad_sample_mode: str = "hooks",
                 max_physical_batch_size: int = 1024, secure_rng: bool = False, task=None, device: str = "auto",
                 dist: ProcessContext = LOCAL):
        """``dist``: this process's place in a data-parallel run (default: a single process); with CUDA each
        rank trains on GPU ``dist.local_rank``."""
        self.task = task or ClassificationTask()
        self.device = resolve_device(device)
        self.dist = dist
        if dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        self.opt_cfg, self.mode = optimizer, grad_sample_mode
        self.mode_reason = grad_sample_mode
        self.max_physical, self.secure = max_physical_batch_size, secure_rng
        self.steps_done = 0
        self.num_devices = 1  # one device per process; data-parallel processes are counted by dist.world_size

    # ---- setup ----
    def resolve_mode(self, model: nn.Module, example: np.ndarray, *, per_example_rows: bool) -> str:
        """Resolve ``grad_sample_mode: auto`` for ``model`` (one input row ``example``); ``per_example_rows``:
        every unit is one row in every batch (no patient units, no augmentation multiplicity), which ghost
        clipping needs. Returns the mode; other modes are returned unchanged."""
        if self.mode != "auto":
            return self.mode
        if not per_example_rows:
            self.mode, self.mode_reason = "hooks", "auto: hooks (several rows per unit: ghost clips rows)"
            return self.mode
        x = _to(torch.as_tensor(np.asarray(example)[:1]), next(model.parameters()).device)
        self.mode, self.mode_reason = choose_grad_sample_mode(model, x)
        return self.mode

    def init(self, model: nn.Module, plan: PrivacyPlan, *, seed: int, dp_seed: int, fix_batchnorm: bool = False,
             ema: float | None = None):
        model = check_model(model, fix=fix_batchnorm).to(self.device)
        if self.dist.active:
            # used for its constructor only: it broadcasts rank 0's initial parameters. Its forward adds
            # nothing, and gradients are not averaged by it: they are summed before the noise in add_noise.
            DifferentiallyPrivateDistributedDataParallel(model)
        self.plan, self.dp_seed = plan, int(dp_seed)
        self.module = model
        self.ema_decay = ema
        self.ema = [p.detach().clone() for p in model.parameters()] if ema else None
        params = [p for p in model.parameters() if p.requires_grad]
        o = self.opt_cfg
        base = (torch.optim.SGD(params, lr=o.lr, momentum=o.momentum) if o.name == "sgd"
                else torch.optim.Adam(params, lr=o.lr))
        self.base_opt = base
        self._gen = torch.Generator(device=self.device)
        if plan.mode == "non_private":
            self.model, self.opt = model, base
            return
        if self.mode == "auto":  # not resolved (resolve_mode): the mode that always applies
            self.mode, self.mode_reason = "hooks", "auto: hooks (not resolved on an example)"
        if plan.privacy_unit != "example" and self.mode == "ghost":
            raise TrainerError("trainer.grad_sample_mode: ghost clipping clips per row, but the privacy unit is "
                               f"{plan.privacy_unit!r}; use grad_sample_mode: hooks for per-patient clipping")
        kw = dict(noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clipping_norm,
                  expected_batch_size=plan.expected_batch_size, loss_reduction="mean")
        if self.mode == "ghost":
            self.model = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="sum", max_grad_norm=plan.clipping_norm,
                use_ghost_clipping=True)
            self.opt = _DPOptimizerGhost(base, **kw)
        else:
            self.model = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            self.opt = _DPOptimizer(base, **kw)
        self.opt.noise_fn = self._noises
        self.opt.sync_fn = self.dist.sum_ if self.dist.active else None

    def _noises(self, refs: list[torch.Tensor], std: float) -> list[torch.Tensor]:
        """One noise tensor per reference (shape, dtype), identical on every rank of a distributed run."""
        if not (self.secure and self.dist.active and std != 0):
            return [self._noise(r.shape, std, r.dtype) for r in refs]
        n = sum(r.numel() for r in refs)  # OS noise differs per rank: rank 0 draws it, everybody gets it
        flat = secure_gaussian(torch.Size([n]), std, torch.float64) if self.dist.is_main else torch.empty(
            n, dtype=torch.float64)
        flat = self.dist.broadcast_(flat.to(self.device))
        return [z.view(r.shape).to(r.dtype) for z, r in zip(flat.split([r.numel() for r in refs]), refs, strict=True)]

    def _noise(self, shape, std: float, dtype) -> torch.Tensor:
        if std == 0:
            return torch.zeros(shape, dtype=dtype, device=self.device)
        if self.secure:
            return secure_gaussian(shape, std, dtype).to(self.device)
        return torch.normal(0.0, std, size=shape, generator=self._gen, dtype=dtype, device=self.device)

    # ---- one step ----
    def _chunks(self, batch: Batch) -> list[np.ndarray]:
        """Row groups of at most max_physical rows that never split a unit."""
        order = np.argsort(batch.units, kind="stable")
        units = batch.units[order]
        cuts = np.flatnonzero(np.diff(units)) + 1
        groups = np.split(order, cuts)
        chunks, cur, size = [], [], 0
        for g in groups:
            if cur and size + len(g) > self.max_physical:
                chunks.append(np.concatenate(cur))
                cur, size = [], 0
            cur.append(g)
            size += len(g)
        if cur:
            chunks.append(np.concatenate(cur))
        return chunks

    def dp_step(self, batch: Batch) -> StepStats:
        seed = np.random.SeedSequence([self.dp_seed, 3, self.steps_done]).generate_state(1, np.uint64)[0]
        self._gen.manual_seed(int(seed) & ((1 << 63) - 1))
        self.model.train()
        if self.plan.mode == "non_private":
            stats = self._plain_step(batch)
        elif len(batch) == 0:  # the whole (global) batch is empty: every rank takes the same noise-only step
            stats = self._noise_only_step()
        else:
            stats = self._private_step(batch)
        if self.dist.active:
            stats = self._global_stats(stats)
        self.steps_done += 1
        if self.ema is not None:  # post-processing of the released parameters: no privacy cost
            d = ema_decay_at(self.ema_decay, self.steps_done)
            with torch.no_grad():
                for e, p in zip(self.ema, self.module.parameters(), strict=True):
                    if p.requires_grad:  # a frozen (public) parameter stays bit-identical
                        e.mul_(d).add_(p.detach(), alpha=1 - d)
        return stats

    def _tensors(self, batch: Batch, rows: np.ndarray):
        x, y = self.task.tensors(batch.x[rows], batch.y[rows])
        return _to(x, self.device), _to(y, self.device), torch.from_numpy(batch.row_weights()[rows]).to(self.device)

    def _share(self, batch: Batch) -> Batch:
        """This rank's rows of the global batch: whole units, ``unit % world_size == rank``."""
        if not self.dist.active:
            return batch
        keep = self.dist.share(batch.units)
        return Batch(batch.x[keep], batch.y[keep], batch.units[keep],
                     None if batch.weights is None else batch.weights[keep])

    def _global_stats(self, stats: StepStats) -> StepStats:
        t = torch.tensor([stats.loss_sum, stats.rows], dtype=torch.float64, device=self.device)
        self.dist.sum_([t])
        return StepStats(float(t[0]), float(t[1]))

    def _plain_step(self, batch: Batch) -> StepStats:
        self.opt.zero_grad(set_to_none=True)
        nonempty = len(batch) > 0  # of the global batch: the same on every rank
        batch = self._share(batch)
        total = 0.0
        for rows in self._chunks(batch) if len(batch) else []:
            x, y, w = self._tensors(batch, rows)
            loss = (w * self.task.per_row_loss(self.model, x, y)).sum()
            (loss / self.plan.expected_batch_size).backward()
            total += float(loss.detach())
        if self.dist.active and nonempty:  # non-private: the plain gradients are summed across ranks
            params = [p for g in self.base_opt.param_groups for p in g["params"]]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.dist.sum_([p.grad for p in params])
        self.opt.step()
        return StepStats(total, float(batch.row_weights().sum()))

    def _noise_only_step(self) -> StepStats:
        std = self.plan.noise_multiplier * self.plan.clipping_norm
        params = self.opt.params
        for p, z in zip(params, self._noises(params, std), strict=True):
            p.grad = z / self.plan.expected_batch_size
        self.base_opt.step()
        self.opt.zero_grad(set_to_none=True)
        return StepStats(0.0, 0)

    def _private_step(self, batch: Batch) -> StepStats:
        if self.mode == "ghost" and len(np.unique(batch.units)) < len(batch):
            raise TrainerError("trainer.grad_sample_mode: ghost clipping clips each row, but this batch has several "
                               "rows per unit (augmentation multiplicity or patients); use grad_sample_mode: hooks")
        batch = self._share(batch)
        if not len(batch):
            return self._empty_share_step()
        chunks = self._chunks(batch)
        total = 0.0
        for i, rows in enumerate(chunks):
            x, y, w = self._tensors(batch, rows)
            per_row = w * self.task.per_row_loss(self.model, x, y)
            if self.mode == "ghost":
                per_row.sum().backward(retain_graph=True)
                coeff = self.model.get_clipping_coef()
                self.opt.zero_grad()
                self.model.disable_hooks()
                (coeff * per_row).sum().backward()
                self.model.enable_hooks()
            else:
                per_row.sum().backward()
                self._sum_per_unit(batch.units[rows])
            total += float(per_row.detach().sum())
            if i < len(chunks) - 1:
                self.opt.signal_skip_step(do_skip=True)
            self.opt.step()
            self.opt.zero_grad()
        return StepStats(total, float(batch.row_weights().sum()))

    def _empty_share_step(self) -> StepStats:
        """Distributed: the global batch is not empty but this rank's share is. The rank still steps (so it
        enters the all-reduce in add_noise) with a zero clipped sum (Opacus's empty-batch path)."""
        for p in self.opt.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.opt.step()
        self.opt.zero_grad()
        return StepStats(0.0, 0)

    def _sum_per_unit(self, units: np.ndarray) -> None:
        """Replace per-row gradients by per-unit sums, so clipping bounds each unit's whole contribution."""
        uniq, inverse = np.unique(units, return_inverse=True)
        if len(uniq) == len(units):
            return
        idx = torch.from_numpy(inverse).to(self.device)
        for p in self.opt.params:
            g = p.grad_sample
            p.grad_sample = torch.zeros((len(uniq), *g.shape[1:]), dtype=g.dtype, device=g.device).index_add_(0, idx, g)

    # ---- inference and state ----
    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities; with ``ema`` the moving-average parameters are used."""
        self.module.train(False)
        params = list(self.module.parameters())
        saved = [p.detach().clone() for p in params] if self.ema is not None else None
        if saved is not None:
            for p, e in zip(params, self.ema, strict=True):
                p.copy_(e)
        try:
            out = []
            for start in range(0, len(x), 1024):
                logits = self.module(torch.from_numpy(np.asarray(x[start:start + 1024])).float().to(self.device))
                out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        finally:
            if saved is not None:
                for p, v in zip(params, saved, strict=True):
                    p.copy_(v)
        return np.concatenate(out) if out else np.zeros((0, 2))

    @torch.no_grad()
    def release_weights(self) -> dict[str, np.ndarray]:
        """The weights ``predict`` uses (the EMA parameters with ``ema``), float32 numpy arrays keyed by the plain
        module's ``state_dict`` names (no GradSampleModule / DPDDP prefix); buffers as they are."""
        module = self.module
        while hasattr(module, "_module"):  # defensive: never the wrapper's "_module." names
            module = module._module
        out = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        if self.ema is not None:
            index = {id(p): i for i, p in enumerate(module.parameters())}
            for name, p in module.named_parameters(remove_duplicate=False):
                out[name] = self.ema[index[id(p)]].detach().cpu()
        return {k: np.ascontiguousarray(v.float().numpy()) if v.is_floating_point() else v.numpy().copy()
                for k, v in out.items()}

    def trained_model(self) -> nn.Module:
        """The plain torch module being trained (live parameters, not the EMA; no Opacus wrapper)."""
        return self.module

    def num_trainable_parameters(self) -> int:
        return int(sum(p.numel() for p in self.parameters()))

    def _frozen(self) -> set[str]:
        return {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def state_dict(self) -> dict:
        """Model (only trainable parameters and buffers when some are frozen), optimiser, steps, EMA: numpy
        arrays and plain values (see the module docstring)."""
        frozen = self._frozen()
        out = {"backend": "opacus",
               "model": {k: _to_numpy(v) for k, v in self.module.state_dict().items() if k not in frozen},
               "optimizer": _optimizer_state(self.base_opt.state_dict()), "steps_done": self.steps_done}
        if self.ema is not None:
            out["ema"] = [_to_numpy(e) for e in self.ema]
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend", "opacus") != "opacus":
            raise TrainerError(f"load_state_dict: checkpoint is from backend {state.get('backend')!r}, not opacus; "
                               "resume with the backend that wrote it")
        frozen = self._frozen()
        model = {k: _to_torch(v) for k, v in state["model"].items()}
        missing, unexpected = self.module.load_state_dict(model, strict=not frozen)
        if unexpected or set(missing) - frozen:
            raise TrainerError(f"load_state_dict: the checkpoint does not match the model (missing "
                               f"{sorted(set(missing) - frozen)[:3]}, unexpected {unexpected[:3]}); resume with "
                               "the recipe and model the run started with")
        self.base_opt.load_state_dict(_torch_optimizer_state(state["optimizer"]))
        self.steps_done = int(state["steps_done"])
        if self.ema is not None:
            if "ema" not in state:
                raise TrainerError("load_state_dict: the checkpoint has no EMA parameters but training.ema is set")
            params = list(self.module.parameters())
            if len(state["ema"]) != len(params):
                raise TrainerError("load_state_dict: the checkpoint's EMA parameters do not match the model")
            self.ema = [_to_torch(e).to(device=self.device, dtype=p.dtype) for e, p in
                        zip(state["ema"], params, strict=True)]

    def parameters(self) -> list[torch.Tensor]:
        """The trainable parameters (backend-specific; outside dptrain.trainers use num_trainable_parameters)."""
        return [p for p in self.module.parameters() if p.requires_grad]
