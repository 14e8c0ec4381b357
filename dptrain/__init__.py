"""dptrain: train models with differential privacy and report, honestly, what privacy costs.

Every epsilon comes from the shared accountant in the ``accounting`` package. The public entry points are
importable from here (loaded lazily, so ``import dptrain`` does not import torch or jax)::

    import dptrain
    recipe = dptrain.load_recipe("recipes/actg175-mlp.yaml", ["privacy.epsilon=4"])
    result = dptrain.train(recipe, "runs/actg-eps4")          # also: synthesize, run_sweep, build_report
    model = dptrain.load_model("runs/actg-eps4")               # the released model (release/ only)
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {"load_recipe": "dptrain.config", "train": "dptrain.run", "synthesize": "dptrain.synth.pipeline",
           "run_sweep": "dptrain.report", "build_report": "dptrain.report", "load_model": "dptrain.release"}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")


__all__ = ["__version__", *_PUBLIC]
