"""The released model of a run: ``release/model.safetensors`` + ``release/model.json``, and how to apply it.

A hospital's first question after training is "apply the model to new records". This module writes the
model in a form that can be shared (plain weights and public facts, nothing secret) and reads it back
without a trainer, Opacus or the training data::

    from dptrain.release import load_model, predict
    model = load_model("runs/actg-eps4")              # a run directory, or its release/ folder
    scores = model.predict_file("new_patients.csv")   # one row per input row: score or prob_<class>
    predict("runs/actg-eps4", "new_patients.csv", "scores.csv")

What is in release/model.*
--------------------------
* ``model.safetensors``: the trained weights and nothing else (no optimiser state, step counter, seed or
  metadata), float32, named as the framework names them: torch ``state_dict`` keys (opacus backend, e.g.
  ``0.weight``) or flax parameter paths joined with ``/`` (jax backend, e.g. ``Dense_0/kernel``; variables
  of another flax collection ``C`` would be ``C/path``). With ``training.ema`` these are the moving-average
  weights, the ones the run evaluated.
* ``model.json``: ``format`` (``dptrain.model/1``), ``backend``, ``model`` (the recipe's model section),
  ``inputs`` (encoded features of a table, or the image shape ``[C, H, W]``), ``classes`` (declared class
  names; ``classes[1]`` is the positive class of a binary model), ``input`` (the public input
  specification) and ``weights`` (``file`` and its ``sha256``). ``input`` is, for tables, ``columns``: the
  columns in encoding order, each ``numeric`` with its declared ``bounds`` or ``categorical`` with its
  declared ``categories``, and ``features``: the names of the encoded columns; for images, ``size``,
  ``channels``, the ``intensity`` range (declared, or fixed by the 8-bit format) and the manifest's
  ``path_column``.

Formal guarantee
----------------
The weights are the output of the DP training run (an EMA of the DP iterates is itself post-processing),
so by the post-processing property of DP the weights, and anything computed from them and public inputs
alone (scores of new records, an ONNX export), carry the run's (epsilon, delta) guarantee for the training
records, per privacy unit, as stated in the run's privacy statement. ``model.json`` holds only the
recipe's model section and declared public facts (bounds, categories, class names, image size and range):
no count, no statistic of the data, no split, no seed. The secret DP noise seed stays in the private
checkpoint: with it the noise could be regenerated and subtracted, which would void the guarantee.

Sharp edges
-----------
* A non-private baseline (``privacy.epsilon: inf``) or a ``clip_only`` run writes the same files: the
  weights carry no guarantee then. The run's privacy statement says which; model.json does not repeat it.
* The guarantee is about the *training* records. Scores of new records are computed from those records;
  sharing them discloses what they disclose about the new patients.
* Encoding follows training exactly: numeric values outside the declared bounds are clipped silently,
  categorical values must be among the declared categories, and missing values are refused (the model has
  no rule for them). Columns are matched by name; extra columns are ignored.
* The sha256 detects a damaged or altered weights file, not a forgery: whoever can write both files can
  replace the model. Sign or checksum release/ out of band where that matters.
* Image models read and resize images with MONAI and torch (as training did), also for a jax model; a
  jax table model needs neither torch nor Opacus.
* ONNX export (:func:`export_onnx`, extra ``onnx``) takes encoded inputs and returns probabilities; the
  encoding (``model.encode``) is not part of the ONNX graph. Jax models are exported through their torch
  twin (MLP and logistic regression, checked numerically); a jax CNN is refused.

Layout: :mod:`~dptrain.release.spec` (file names, format, errors), :mod:`~dptrain.release.nets` (the networks),
:mod:`~dptrain.release.save` (writing), :mod:`~dptrain.release.model` (reading, encoding, scoring) and
:mod:`~dptrain.release.export` (ONNX). Importing this package imports neither torch nor jax.
"""

from __future__ import annotations

from dptrain.release.export import export_onnx
from dptrain.release.model import ReleasedModel, load_model, predict, scores_frame
from dptrain.release.nets import flax_weight_dict
from dptrain.release.save import save_release_model
from dptrain.release.spec import FORMAT, RELEASE_DIR, SPEC_FILE, WEIGHTS_FILE, ReleaseError

__all__ = ["FORMAT", "RELEASE_DIR", "SPEC_FILE", "WEIGHTS_FILE", "ReleaseError", "ReleasedModel", "export_onnx",
           "flax_weight_dict", "load_model", "predict", "save_release_model", "scores_frame"]
