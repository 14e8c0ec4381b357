"""Recipe schema (pydantic: strict, frozen, extra fields forbidden) and YAML loading with overrides.

``load_recipe(path, overrides=["privacy.epsilon=2"])`` reads the file with the recipe YAML rules below, applies
dotted overrides (read with the same rules), validates, and reports *all* errors at once, each with the field,
the value and the fix (one problem: one line).

YAML rules (recipe files and ``--set`` values alike; YAML 1.2 core schema style, not PyYAML's YAML 1.1):

* numbers: ``8``, ``-3``, ``1_000``, ``0x1f``, ``0o17`` are integers (``012`` is twelve, not octal ten);
  ``0.5``, ``1e-5``, ``1E5``, ``2.5e+3``, ``.5`` are floats; ``inf``, ``+inf``, ``-inf``, ``.inf``, ``infinity``
  (any case) are infinities and ``nan``, ``.nan`` is not-a-number (refused by every field). A float with an
  integral value (``1e5``) is accepted where the schema wants an integer.
* booleans: only ``true`` and ``false`` (also ``True``, ``TRUE``, ``False``, ``FALSE``). ``yes``, ``no``, ``on``,
  ``off``, ``y``, ``n`` are strings, so ``positive_label: yes`` is the label ``"yes"``.
* ``null``, ``~`` and an empty value are null. Dates are strings (no timestamp type).
* quote a value to make it a string whatever it looks like: ``name: "1e5"``, ``label: "inf"``.
* refused: anchors and aliases (``&a`` / ``*a``: a recipe is written out, and alias expansion is how a small
  file becomes a huge tree), a key given twice in one mapping (the last would win silently), nesting deeper
  than 32 levels, files over 1 MiB, files that are not UTF-8 text.

``dump_recipe`` writes YAML that reads back identically with these rules and with ``yaml.safe_load``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from accounting.errors import MAX_NOISE_MULTIPLIER, MAX_TARGET_EPSILON, MIN_NOISE_MULTIPLIER

MAX_SEED = 2**32 - 1  # numpy, torch and jax all accept seeds in [0, 2**32 - 1]
MAX_WIDTH = 65536  # widest hidden layer / most conv channels: a wider one is a typo (and allocates gigabytes)
MAX_CANARIES = 100_000  # each canary is an extra training unit: beyond ~1e5 steps and memory grow for nothing
#                         (an audit certifies nothing more past ~1000 canaries at delta 1e-5; see README)
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; 1 MiB leaves room for long category lists
MAX_YAML_DEPTH = 32  # recipes nest 4 levels deep


class RecipeError(ValueError):
    """A recipe is invalid; the message lists every problem, one per line."""


def _integral(v: Any) -> Any:
    """Accept a float with an integral value where an integer is wanted (``1e5`` -> 100000)."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]
Seed = Annotated[Int, Field(ge=0, le=MAX_SEED, description="a seed in [0, 2**32 - 1]")]
Width = Annotated[Int, Field(ge=1, le=MAX_WIDTH)]


def _finite(default: Any = ..., **kw) -> Any:
    """A float field that refuses inf and nan."""
    return Field(default, allow_inf_nan=False, **kw)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageConfig(_Strict):
    size: Int = Field(64, ge=8, le=1024, description="images are resized to size x size")
    channels: Literal[1, 3] = Field(1, description="1: grayscale (RGB averaged), 3: RGB")
    intensity: list[float] | None = Field(
        None, description="declared input intensity range [low, high] mapped to [0, 1] (default [0, 255] for "
                          "8-bit PNG/JPEG); never computed from the data")
    path_column: str = Field("path", description="manifest column holding image paths (relative to the manifest)")
    allow_outside: bool = Field(False, description="read manifest paths that resolve outside the manifest's folder "
                                                   "('..', absolute paths, symbolic links); default: refused")

    @field_validator("intensity")
    @classmethod
    def _range(cls, v):
        if v is not None and (len(v) != 2 or not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1])):
            raise ValueError(f"data.image.intensity must be [low, high] with low < high, got {v}")
        return v


class DataConfig(_Strict):
    source: str = Field(description="builtin:NAME, or a path to a .csv / .parquet file")
    label: str | None = Field(None, description="label column (built-ins have a default)")
    positive_label: str | int | None = Field(None, description="value of the label that counts as positive")
    numeric: dict[str, list[float]] | None = Field(
        None, description="numeric feature -> declared public bounds [low, high]; values are clipped to them")
    categorical: dict[str, list[str | int]] | None = Field(
        None, description="categorical feature -> declared public list of categories (one-hot)")
    sensitive: list[str] | None = Field(None, description="sensitive attributes kept for fairness reports")
    privacy_unit: str | None = Field(None, description="column identifying a patient; null = per example")
    test_fraction: float = _finite(0.25, gt=0, lt=1)
    validation_fraction: float = _finite(0.0, ge=0, lt=1, description="share of units held out for validation "
                                         "(model selection in sweeps); 0: none")
    split_seed: Int = Field(0, ge=0, le=MAX_SEED, description="seed of the train/validation/test split, apart "
                            "from the training seed: every run of a sweep shares one split (0 to 2**32 - 1)")
    classes: list[str | int] | None = Field(
        None, description="declared class names (public), in label order; required where the labels are not "
                          "described by positive_label or a built-in's public metadata (text labels, MedMNIST)")
    id: str | None = Field(None, description="dataset identity for the dataset budget (default: the built-in's "
                                             "name, or a content hash of the source file)")
    image: ImageConfig | None = Field(None, description="set for image data: a manifest CSV, a MedMNIST .npz, "
                                                        "or a built-in image dataset")
    text: str | None = Field(None, description="text data (dptrain synth): the text column of a CSV / JSONL file "
                                               "(default 'text')")

    @model_validator(mode="after")
    def _fractions(self):
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(f"data.test_fraction + data.validation_fraction must be < 1, got "
                             f"{self.test_fraction} + {self.validation_fraction}")
        return self

    @field_validator("numeric")
    @classmethod
    def _bounds(cls, v):
        for name, pair in (v or {}).items():
            if len(pair) != 2:
                raise ValueError(f"bounds of {name!r} must be [low, high], got {pair}")
            lo, hi = pair
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"bounds of {name!r} must be finite with low < high, got [{lo}, {hi}]")
        return v


class LoraConfig(_Strict):
    r: Int = Field(8, ge=1, le=256, description="LoRA rank")
    alpha: Int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r)")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    top_layers: Int | None = Field(None, ge=1, le=1024, description="adapters only in the last K decoder layers "
                                                                    "(null: all)")
    cache_frozen_layers: bool = Field(True, description="with top_layers: run the frozen layers below once per "
                                                        "record and cache them (exact; Llama-style decoders)")


class ModelConfig(_Strict):
    name: Literal["mlp", "logistic", "cnn", "causal_lm"] = "mlp"
    source: str | None = Field(None, description="causal_lm: builtin:smollm2-135m, a local model directory or a "
                                                 "Hugging Face hub id")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="causal_lm: LoRA adapters (only they train)")
    max_length: Int = Field(128, ge=8, le=4096, description="causal_lm: tokens per record incl. the prompt")
    hidden: list[Width] = Field(default_factory=lambda: [64, 64], max_length=64,
                                description=f"mlp: width of each hidden layer (1 to {MAX_WIDTH}; at most 64 layers)")
    activation: Literal["relu", "tanh", "gelu"] = "tanh"
    channels: list[Width] = Field(default_factory=lambda: [16, 32, 64], min_length=1, max_length=64,
                                  description="cnn: channels per conv layer")
    strides: list[Annotated[Int, Field(ge=1, le=8)]] = Field(default_factory=lambda: [2, 2, 2], min_length=1,
                                                             max_length=64, description="cnn: stride per conv layer")
    groups: Int = Field(8, ge=1, le=MAX_WIDTH, description="cnn: GroupNorm groups (never BatchNorm)")
    weight_standardization: bool = Field(False, description="cnn: standardise conv weights (De et al. 2022)")
    fix_batchnorm: bool = Field(False, description="replace BatchNorm with GroupNorm (Opacus ModuleValidator.fix)")

    @model_validator(mode="after")
    def _cnn_shape(self):
        if self.name != "cnn":
            return self
        if len(self.channels) != len(self.strides):
            raise ValueError(f"model.channels ({len(self.channels)} entries) and model.strides "
                             f"({len(self.strides)} entries) must have the same length: one stride per conv layer")
        bad = [c for c in self.channels[:-1] if c % self.groups]
        if bad:
            raise ValueError(f"model.groups={self.groups} must divide every model.channels entry but the last; "
                             f"{bad} do not (GroupNorm splits the channels into groups)")
        return self


# Which fields each variant reads: a field of another variant set to a non-default value is refused (it would be
# accepted and ignored). Defaults stay legal everywhere, so a dumped recipe (config.yaml, every field written)
# parses again.
MODEL_FIELDS = {"mlp": {"hidden", "activation"}, "logistic": set(),
                "cnn": {"channels", "strides", "groups", "weight_standardization"},
                "causal_lm": {"source", "lora", "max_length"}}
TRAINER_FIELDS = {"opacus": {"grad_sample_mode", "device"}, "jax": {"clipping"}}


def _foreign_fields(section, variant: str, fields_of: dict[str, set[str]], prefix: str, discriminator: str) -> list:
    """Fields of ``section`` that belong to another variant and were set to a non-default value."""
    owned = fields_of[variant]
    foreign = set().union(*fields_of.values()) - owned
    out = []
    for name in sorted(foreign):
        default = type(section).model_fields[name].get_default(call_default_factory=True)
        if getattr(section, name) != default:
            users = [v for v, f in fields_of.items() if name in f]
            out.append(f"{prefix}.{name} is only read with {prefix}.{discriminator}: {' or '.join(users)} (this recipe "
                       f"has {variant}); remove it")
    return out


class TrainerConfig(_Strict):
    backend: Literal["opacus", "jax"] = "opacus"
    grad_sample_mode: Literal["hooks", "ghost"] = Field("hooks", description="opacus: per-sample hooks or ghost clipping")
    clipping: Literal["auto", "vmap"] = Field(
        "auto", description="jax: fast per-layer clipping where possible (auto) or vmap per-example gradients")
    max_physical_batch_size: Int = Field(1024, ge=1, le=1 << 20,
                                         description="split larger logical batches into virtual steps")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="opacus: where to train (auto: the CUDA GPU if torch sees one); jax picks its own")


class AuditConfig(_Strict):
    canaries: Int = Field(0, ge=0, le=MAX_CANARIES, description="synthetic canaries, each trained on with "
                          f"probability 1/2 (0: none; at most {MAX_CANARIES}: each is an extra training unit, and "
                          "the bound stops growing long before)")
    confidence: float = _finite(0.95, gt=0.5, lt=1, description="confidence of the empirical lower bound")

    @model_validator(mode="after")
    def _enough(self):
        if 0 < self.canaries < 20:
            raise ValueError(f"privacy.audit.canaries must be 0 (no canary audit) or >= 20, got {self.canaries}; "
                             "an audit with fewer canaries cannot certify anything (use 500-1000)")
        return self


class PrivacyConfig(_Strict):
    epsilon: float | None = Field(None, description=f"target epsilon, > 0 and at most {MAX_TARGET_EPSILON:g}; "
                                                    "inf = non-private baseline")
    noise_multiplier: float | None = _finite(
        None, ge=0, le=MAX_NOISE_MULTIPLIER, description=f"instead of epsilon: a fixed noise multiplier "
        f"({MIN_NOISE_MULTIPLIER:g} to {MAX_NOISE_MULTIPLIER:g})")
    delta: float | None = _finite(None, gt=0, lt=1, description="default: 1 / (10 n) rounded down to a power of 10")
    clipping_norm: float = _finite(1.0, gt=0, le=1e6)
    sampling: Literal["poisson", "shuffled"] = "poisson"
    accountant: Literal["pld", "rdp"] = "pld"
    clip_only: bool = Field(False, description="debugging: clip per example but add no noise (NOT private)")
    secure_rng: bool = Field(False, description="draw noise from the OS CSPRNG (slower)")
    dataset_budget: float | None = _finite(None, gt=0, description="create a total epsilon budget for all runs on "
                                        "this dataset (kept in $DPTRAIN_HOME/budgets; once it exists every run on the "
                                        "dataset is charged, whether or not its recipe names it)")
    dataset_size: Int | None = Field(
        None, ge=1, le=10**12, description="a public, declared number of privacy units: q = batch_size / dataset_size. "
                                "null: the number is estimated with a DP count (Gaussian, count_noise_multiplier) "
                                "composed into the same ledger; the exact count is never used or released")
    count_noise_multiplier: float = _finite(20.0, ge=MIN_NOISE_MULTIPLIER, le=MAX_NOISE_MULTIPLIER, description="std of the Gaussian noise of the DP count of "
                                                                  "privacy units (sensitivity 1, add/remove)")
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _one_of(self):
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give privacy.epsilon or privacy.noise_multiplier, not both")
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("give privacy.epsilon (e.g. 8, or inf for the non-private baseline) "
                             "or privacy.noise_multiplier")
        if self.epsilon is not None and math.isnan(self.epsilon):
            raise ValueError("privacy.epsilon is nan, not a number; give e.g. 8, or inf for the non-private baseline")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"privacy.epsilon must be > 0 (or inf), got {self.epsilon}")
        if self.epsilon is not None and MAX_TARGET_EPSILON < self.epsilon < math.inf:
            raise ValueError(f"privacy.epsilon must be at most {MAX_TARGET_EPSILON:g} (a larger epsilon bounds "
                             f"nothing useful: e^{MAX_TARGET_EPSILON:g} ~ 1e43), or inf for the non-private "
                             f"baseline, got {self.epsilon:g}")
        if self.noise_multiplier is not None and 0 < self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise ValueError(f"privacy.noise_multiplier must be at least {MIN_NOISE_MULTIPLIER:g} (below, one step "
                             "alone costs a huge epsilon and the accountant's time grows as 1/sigma^2; typical "
                             f"values are 0.5 to 5), got {self.noise_multiplier:g}")
        return self

    @property
    def non_private(self) -> bool:
        return self.epsilon is not None and math.isinf(self.epsilon)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = _finite(0.5, gt=0, le=100, description="learning rate (> 0, at most 100)")
    momentum: float = _finite(0.0, ge=0, lt=1)


class TrainingConfig(_Strict):
    epochs: float = _finite(20, gt=0, le=10_000, description="passes over the data (> 0, at most 10000)")
    batch_size: Int = Field(256, ge=1, le=1 << 24, description="expected (logical) batch size")
    augment: Literal["none", "flip_shift"] = Field(
        "none", description="images: random horizontal flip + shift by up to 4 pixels (reflect padding)")
    augmult: Int = Field(1, ge=1, le=64, description="augmentation multiplicity K: each unit's gradient is the "
                                                      "mean over K augmentations, clipped once (De et al. 2022)")
    ema: float | None = _finite(None, ge=0, lt=1, description="decay of an exponential moving average of the "
                                                            "parameters used for evaluation (e.g. 0.99); null: off")

    @model_validator(mode="after")
    def _augmult(self):
        if self.augmult > 1 and self.augment == "none":
            raise ValueError(f"training.augmult={self.augmult} needs an augmentation: set training.augment: "
                             "flip_shift (or augmult: 1)")
        return self


class GenerationConfig(_Strict):
    top_k: Int = Field(50, ge=0, le=10**6, description="sample from the k most likely tokens (0: off)")
    top_p: float = _finite(0.95, gt=0, le=1, description="nucleus sampling mass")
    temperature: float = _finite(1.0, gt=0, le=100)
    max_new_tokens: Int = Field(96, ge=1, le=4096)
    batch_size: Int = Field(32, ge=1, le=4096)
    seed: Seed = 0


class SynthEvaluationConfig(_Strict):
    canaries: Int = Field(2, ge=0, le=1000, description="secret canary sentences per repetition count (0: no "
                                                         "exposure test)")
    canary_repetitions: list[Int] = Field(default_factory=lambda: [1, 10], max_length=16, description="each canary "
                                          "is inserted this many times into training (Carlini et al. 2019)")
    canary_references: Int = Field(2000, ge=10, le=10**6, description="random candidates an exposure is estimated "
                                                                      "from")
    fidelity_records: Int = Field(300, ge=10, le=10**6, description="real held-out records for fidelity (MiniLM "
                                                                    "embeddings)")
    ngram: Int = Field(8, ge=2, le=64, description="memorisation: word n-gram length shared with a training record")
    dp_baseline: bool = Field(True, description="also train the downstream classifier on real data with DP")


class SynthesisConfig(_Strict):
    prompt: str = Field("Chest X-ray report ({label}):", description="public template; {label} is the class name")
    records: Int = Field(200, ge=1, le=10**6, description="synthetic records to generate")
    label_counts: Literal["dp_histogram", "prior"] = Field(
        "dp_histogram", description="records per label from a DP histogram (accounted) or a declared public prior")
    prior: list[float] | None = Field(None, description="label_counts: prior -- public class weights, one per class")
    histogram_noise_multiplier: float = _finite(20.0, ge=MIN_NOISE_MULTIPLIER, le=MAX_NOISE_MULTIPLIER, description="histogram noise std (its L2 sensitivity "
                                                                      "is 1 under add/remove)")
    train_fraction: float | None = _finite(None, gt=0, le=1, description="train on this public share of the records: "
                                         "each kept independently (keyed hash of its text < train_fraction)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluation: SynthEvaluationConfig = Field(default_factory=SynthEvaluationConfig)

    @model_validator(mode="after")
    def _checks(self):
        if "{label}" not in self.prompt:
            raise ValueError(f"synthesis.prompt must contain {{label}} (labels condition generation), got {self.prompt!r}")
        if self.label_counts == "prior" and not self.prior:
            raise ValueError("synthesis.label_counts: prior needs synthesis.prior (public class weights, e.g. [0.4, 0.6])")
        if self.prior is not None and (any(not (0 <= w < math.inf) for w in self.prior) or sum(self.prior) <= 0):
            raise ValueError(f"synthesis.prior must be finite weights >= 0 with a positive sum, got {self.prior}")
        if any(not 1 <= r <= 1000 for r in self.evaluation.canary_repetitions):
            raise ValueError("synthesis.evaluation.canary_repetitions must be >= 1 (and at most 1000)")
        return self


class Recipe(_Strict):
    name: str = "run"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    privacy: PrivacyConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    synthesis: SynthesisConfig | None = Field(None, description="dptrain synth: DP synthetic text from a causal LM")
    seed: Seed = 0

    @model_validator(mode="after")
    def _synth(self):
        foreign = (_foreign_fields(self.model, self.model.name, MODEL_FIELDS, "model", "name")
                   + _foreign_fields(self.trainer, self.trainer.backend, TRAINER_FIELDS, "trainer", "backend"))
        if foreign:
            raise ValueError("; ".join(foreign))
        lm = self.model.name == "causal_lm"
        if lm and self.synthesis is None:
            raise ValueError("model.name: causal_lm needs a synthesis section (see recipes/iu-xray-reports-synth.yaml)")
        if self.synthesis is not None and not lm:
            raise ValueError("synthesis: needs model.name: causal_lm and model.source")
        if lm and not self.model.source:
            raise ValueError("model.source: required for causal_lm (e.g. builtin:smollm2-135m)")
        if lm and self.trainer.backend != "opacus":
            raise ValueError("trainer.backend: causal LM fine-tuning runs on the opacus backend; set backend: opacus")
        if lm:  # options of `dptrain train` that dptrain synth does not implement: refuse, never ignore
            unsupported = {
                "data.privacy_unit": self.data.privacy_unit is not None,
                "privacy.audit.canaries (synthesis.evaluation.canaries measures exposure instead)":
                    self.privacy.audit.canaries > 0,
                "training.augment": self.training.augment != "none", "training.augmult": self.training.augmult > 1,
                "training.ema": self.training.ema is not None, "data.image": self.data.image is not None,
            }
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(f"dptrain synth does not support {', '.join(bad)} yet (the guarantee is per "
                                 "record); remove them from the recipe")
        return self


# ---- YAML: the recipe rules (module docstring) ----

_INT = re.compile(r"^[-+]?(?:[0-9]+(?:_[0-9]+)*|0x[0-9a-fA-F]+|0o[0-7]+)$")
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9]+(?:_[0-9]+)*(?:\.[0-9]*(?:_[0-9]+)*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                         |[-+]?\.?(?:inf|Inf|INF)|[-+]?(?:infinity|Infinity|INFINITY)|\.?(?:nan|NaN|NAN))$""", re.X)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_TAG = "tag:yaml.org,2002:"


class _YAMLLimit(yaml.YAMLError):
    """A recipe YAML construct refused by the recipe rules (alias, duplicate key, too deep)."""


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with the recipe rules: YAML 1.2-style numbers and booleans, no aliases, no duplicate keys."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise _YAMLLimit(f"line {ev.start_mark.line + 1}: an alias (*{ev.anchor}) is not allowed in a recipe; "
                             "write the value out")
        ev = self.peek_event()
        if getattr(ev, "anchor", None):
            raise _YAMLLimit(f"line {ev.start_mark.line + 1}: an anchor (&{ev.anchor}) is not allowed in a recipe; "
                             "write each value out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YAMLLimit(f"line {ev.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        raise _YAMLLimit(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (also on "
                                         f"line {seen[key]}); give it once")
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the constructor reports it
                    pass
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        text = text.lstrip("+-")
        if text[:2] in ("0x", "0o"):
            return sign * int(text[2:], 16 if text[1] == "x" else 8)
        return sign * int(text, 10)  # "012" is twelve (YAML 1.2), not octal


_RecipeLoader.add_implicit_resolver(_TAG + "bool", _BOOL, list("tTfF"))
_RecipeLoader.add_implicit_resolver(_TAG + "null", _NULL, ["~", "n", "N", ""])
_RecipeLoader.add_implicit_resolver(_TAG + "int", _INT, list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(_TAG + "float", _FLOAT, list("-+0123456789.iInN"))
_RecipeLoader.add_constructor(_TAG + "int", _RecipeLoader.construct_yaml_int)


class _RecipeDumper(yaml.SafeDumper):
    """Quotes every string that either the recipe rules or YAML 1.1 (``yaml.safe_load``) would read as another
    type, so the dump reads back identically with both."""


for _tag, _rx, _first in ((_TAG + "bool", _BOOL, "tTfF"), (_TAG + "int", _INT, "-+0123456789"),
                          (_TAG + "float", _FLOAT, "-+0123456789.iInN")):
    _RecipeDumper.add_implicit_resolver(_tag, _rx, list(_first))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own messages span several lines)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(x) for x in (err.context, err.problem) if x)
        return " ".join(f"{where}{what}".split())
    return " ".join(str(err).split())


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _set_dotted(tree: dict[str, Any], dotted: str) -> None:
    if "=" not in dotted:
        raise RecipeError(f"--set {dotted!r}: expected KEY=VALUE, e.g. --set privacy.epsilon=2")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError(f"--set {dotted!r}: {key.strip()!r} is not a field name; expected SECTION.FIELD=VALUE, "
                          "e.g. --set privacy.epsilon=2")
    try:
        value = _read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {dotted!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it, e.g. "
                          f"--set '{key}=\"...\"'") from None
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "recipe"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _message(err: dict) -> str:
    msg, value, kind = err["msg"].removeprefix("Value error, "), err.get("input"), err["type"]
    if kind == "extra_forbidden":
        return "unknown field; check the spelling (see recipes/ for examples)"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        return f"{msg}; put the value in quotes to mean the text"
    if kind == "bool_type" and isinstance(value, str):
        return f"{msg}; write true or false"
    if kind in ("int_type", "float_type") and isinstance(value, str):
        return f"{msg} such as 8, 0.5, 1e-5 or inf"
    if kind == "finite_number":
        return f"{msg} (inf and nan are not allowed here)"
    return msg


def parse_recipe(tree: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe tree; ``source`` (the file) is named in the error."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            value = err.get("input")
            shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" (got {_shown(value)})"
            lines.append(f"{_loc(err)}: {_message(err)}{shown}")
        where = f" {source}" if source else ""
        if len(lines) == 1:
            raise RecipeError(f"invalid recipe{where}: {lines[0]}") from None
        raise RecipeError(f"invalid recipe{where} ({len(lines)} problems):\n" + "\n".join(f"  {x}" for x in lines)) \
            from None


def _recipe_text(path: Path) -> str:
    """The file's text, or a RecipeError naming the file and what is wrong with it."""
    try:
        if path.is_dir():
            raise RecipeError(f"recipe {path}: is a directory, not a recipe file; give a .yaml file "
                              "(see recipes/ for ready recipes)")
        if not path.exists():
            raise RecipeError(f"recipe: no file at {path}; see recipes/ for ready recipes")
        if not path.is_file():
            raise RecipeError(f"recipe {path}: is not a regular file; give a .yaml file")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path}: {size} bytes is too large for a recipe (at most "
                              f"{MAX_RECIPE_BYTES} bytes); is it the right file?")
        data = path.read_bytes()[:MAX_RECIPE_BYTES + 1]
    except PermissionError:
        raise RecipeError(f"recipe {path}: cannot be read (permission denied)") from None
    except OSError as err:
        raise RecipeError(f"recipe {path}: cannot be read ({err.strerror or err})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and (data[0] == 0) != (data[1] == 0)):
        raise RecipeError(f"recipe {path}: is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise RecipeError(f"recipe {path}: is a binary file, not YAML text; give a .yaml recipe")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path}: is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None
    bad = next((c for c in text if ord(c) < 32 and c not in "\t\n\r"), None)
    if bad is not None:
        raise RecipeError(f"recipe {path}: holds a control character (U+{ord(bad):04X}); is it a text file?")
    return text


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    text = _recipe_text(path)
    try:
        tree = _read_yaml(text)
    except _YAMLLimit as err:
        raise RecipeError(f"recipe {path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise RecipeError(f"recipe {path}: nested too deeply") from None
    if tree is None:
        raise RecipeError(f"recipe {path}: is empty; expected a mapping of sections (data, model, privacy, ...); "
                          "see recipes/ for examples")
    if not isinstance(tree, dict):
        kind = {list: "a list", str: "a single string"}.get(type(tree), f"a single value ({type(tree).__name__})")
        raise RecipeError(f"recipe {path}: expected a mapping of sections (data, model, privacy, ...), got {kind}")
    for o in overrides or []:
        _set_dotted(tree, o)
    return parse_recipe(tree, str(path))


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False)
