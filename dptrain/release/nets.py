"""The networks of a released model, without a trainer or Opacus: torch only for an opacus model, jax and flax
only for a jax model (each imported when such a model is built, so a jax model never needs torch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from dptrain.release.spec import ReleaseError

if TYPE_CHECKING:
    from dptrain.config import ModelConfig


def flax_weight_dict(params, others=None) -> dict[str, np.ndarray]:
    """Flax variables -> {name: float32 array}: ``params`` paths joined with "/", other collections ``C/path``."""
    from flax import traverse_util

    out: dict[str, np.ndarray] = {}
    trees = [("params", params), *sorted((others or {}).items())]
    for collection, tree in trees:
        for path, value in traverse_util.flatten_dict(dict(tree)).items():
            name = "/".join(path) if collection == "params" else "/".join((collection, *path))
            if name in out:
                raise ReleaseError(f"weights: the name {name!r} is used twice (a module named like the flax "
                                   f"collection {collection!r}); rename the module")
            out[name] = _as_float32(np.asarray(value), name)
    return out


def _as_float32(arr: np.ndarray, name: str) -> np.ndarray:
    """Floating point -> float32; integer buffers (none in the built-in models) are kept as they are."""
    if np.issubdtype(arr.dtype, np.floating):
        return np.ascontiguousarray(arr, dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return np.ascontiguousarray(arr)
    raise ReleaseError(f"weights: {name!r} has dtype {arr.dtype}, expected floating point weights")


class _TorchNet:
    def __init__(self, cfg: ModelConfig, inputs, num_classes: int):
        try:
            import torch

            from dptrain.models.torch_models import build_torch_model
        except ImportError as err:
            raise ReleaseError(f"this model needs torch ({err}); pip install 'dptrain[torch]'") from None
        self.torch = torch
        with torch.random.fork_rng(devices=[]):  # the initial values are replaced; the global RNG is untouched
            torch.manual_seed(0)
            self.module = build_torch_model(cfg, inputs if isinstance(inputs, int) else tuple(inputs), num_classes,
                                           pretrained=False)
        self.module.train(False)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.module.state_dict().items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        torch = self.torch
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        self.module.load_state_dict(state, strict=True)  # copies into the module's own dtypes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for start in range(0, len(x), 1024):  # as OpacusTrainer.predict
                logits = self.module(torch.from_numpy(np.ascontiguousarray(x[start:start + 1024])).float())
                out.append(torch.softmax(logits, dim=-1).numpy())
        return np.concatenate(out)


class _FlaxNet:
    def __init__(self, cfg: ModelConfig, inputs, num_classes: int):
        try:
            import jax
            import jax.numpy as jnp
            from flax import traverse_util

            from dptrain.models.flax_models import build_flax_model
        except ImportError as err:
            raise ReleaseError(f"this model needs jax and flax ({err}); pip install 'dptrain[jax]'") from None
        self.jax, self.jnp, self.tu = jax, jnp, traverse_util
        self.model = model = build_flax_model(cfg, inputs if isinstance(inputs, int) else tuple(inputs), num_classes)
        self.dtype = jnp.dtype(getattr(model, "input_dtype", "float32"))
        probe = jnp.zeros((1, *model.input_shape), self.dtype)
        self._struct = jax.eval_shape(lambda: dict(model.init(jax.random.key(0), probe)))
        self._names: dict[str, tuple[str, tuple[str, ...]]] = {}
        for collection in sorted(self._struct, key=lambda c: c != "params"):
            for path in traverse_util.flatten_dict(dict(self._struct[collection])):
                name = "/".join(path) if collection == "params" else "/".join((collection, *path))
                self._names[name] = (collection, path)
        self.variables = None

        def predict(variables, x):
            return jax.nn.softmax(model.apply(variables, x).astype(jnp.float32), axis=-1)

        self._predict = jax.jit(predict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        flat = {c: self.tu.flatten_dict(dict(t)) for c, t in self._struct.items()}
        return {name: tuple(flat[c][p].shape) for name, (c, p) in self._names.items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        struct = {c: self.tu.flatten_dict(dict(t)) for c, t in self._struct.items()}
        flat: dict[str, dict] = {c: {} for c in self._struct}
        for name, (c, path) in self._names.items():
            flat[c][path] = self.jnp.asarray(arrays[name], struct[c][path].dtype)
        self.variables = {c: self.tu.unflatten_dict(v) for c, v in flat.items()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), 4096):  # as JaxTrainer.predict: padded to a power of two
            part = x[start:start + 4096]
            pad = (1 << max(0, math.ceil(math.log2(max(len(part), 1))))) - len(part)
            padded = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)]) if pad else part
            probs = self._predict(self.variables, self.jnp.asarray(padded, self.dtype))
            out.append(np.asarray(probs)[: len(part)])
        return np.concatenate(out)


def _build_net(backend: str, cfg: ModelConfig, inputs, num_classes: int):
    try:
        return (_TorchNet if backend == "opacus" else _FlaxNet)(cfg, inputs, num_classes)
    except ValueError as err:
        if isinstance(err, ReleaseError):
            raise
        raise ReleaseError(f"model.json: the model section cannot be built ({err})") from None
