"""ONNX export of a released model (extra ``onnx``): checked with onnxruntime before it is written."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np

from dptrain.release.model import ReleasedModel, _check_out, load_model
from dptrain.release.nets import _TorchNet
from dptrain.release.spec import FORMAT, ONNX_TOLERANCE, ReleaseError


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter)
        import torch
    except ImportError as err:
        raise ReleaseError(f"ONNX export needs the onnx extra ({err}); pip install 'dptrain[onnx]'") from None
    return torch, onnx, onnxruntime


def _torch_twin(model: ReleasedModel):
    """The torch model of a jax MLP / logistic regression, with the flax weights (kernels transposed)."""
    from torch import nn

    cfg = model.model_config
    if cfg.name not in ("mlp", "logistic"):
        raise ReleaseError(f"ONNX export of a jax {cfg.name} model is not supported yet (only mlp and logistic "
                           "have an exact torch twin); train with trainer.backend: opacus to export it")
    net = _TorchNet(cfg, model.input_shape[0], len(model.classes))
    params = model._net.variables["params"]
    if set(model._net.variables) != {"params"}:
        raise ReleaseError("ONNX export: this jax model has non-trainable variables; not supported yet")
    linears = [m for m in net.module if isinstance(m, nn.Linear)]
    if len(linears) != len(params):
        raise ReleaseError("ONNX export: the jax and torch models differ in depth; not supported yet")
    arrays = {}
    for lin, dense in zip(linears, [params[f"Dense_{j}"] for j in range(len(params))], strict=True):
        idx = list(net.module).index(lin)
        arrays[f"{idx}.weight"] = np.asarray(dense["kernel"]).T
        arrays[f"{idx}.bias"] = np.asarray(dense["bias"])
    net.load(arrays)
    return net.module


def export_onnx(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export the released model of ``run_dir`` to ONNX at ``out`` (atomically); returns ``out``.

    The graph takes the encoded inputs (``input``: float32 (batch, ...), dynamic batch) and returns the class
    probabilities (``probabilities``: (batch, classes)); the export is checked with onnxruntime against
    :meth:`ReleasedModel.predict_proba` (max abs difference <= 1e-5; 1e-4 with a pretrained backbone) before it
    is written. Jax models are exported through their torch twin (mlp, logistic); a jax cnn is refused."""
    out = _check_out(Path(out), ".onnx", overwrite)
    torch, onnx, ort = _onnx_modules()
    from torch import nn

    from accounting.atomic import atomic_write_bytes

    model = load_model(run_dir)
    module = model._net.module if model.backend == "opacus" else _torch_twin(model)
    wrapped = nn.Sequential(module, nn.Softmax(dim=-1)).train(False)
    probe = np.random.default_rng(0).uniform(0.0 if model.is_image else -1.0, 1.0,
                                             size=(5, *model.input_shape)).astype(np.float32)
    expected = model.predict_proba(probe)
    with torch.no_grad():
        twin = torch.softmax(module(torch.from_numpy(probe)), dim=-1).numpy()
    if np.max(np.abs(twin - expected)) > ONNX_TOLERANCE:
        raise ReleaseError(f"ONNX export: the torch model differs from the released model by "
                           f"{np.max(np.abs(twin - expected)):.2g}; not exported")
    quiet = logging.getLogger("torch.onnx")  # the exporter logs skipped torchvision ops, irrelevant here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export internals
            program = torch.onnx.export(wrapped, (torch.from_numpy(probe[:2]),), input_names=["input"],
                                        output_names=["probabilities"], dynamo=True, external_data=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as err:  # the exporter's failures are long; one line
        raise ReleaseError(f"ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    for key, value in (("dptrain.format", FORMAT), ("dptrain.classes", json.dumps(model.classes)),
                       ("dptrain.input", json.dumps(model.input_spec)), ("dptrain.weights_sha256",
                                                                        model.spec["weights"]["sha256"])):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    blob = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(blob))
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"input": probe})[0]
    # a pretrained backbone has ~70 layers: onnxruntime's float rounding reaches ~1e-5 in its features alone
    tolerance = ONNX_TOLERANCE * (10 if model.model_config.name == "pretrained" else 1)
    if np.max(np.abs(got - expected)) > tolerance:
        raise ReleaseError(f"ONNX export: onnxruntime differs from the released model by "
                           f"{np.max(np.abs(got - expected)):.2g}; not exported")
    atomic_write_bytes(out, blob)
    return out
