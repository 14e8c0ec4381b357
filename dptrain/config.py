"""Recipe schema (pydantic: strict, frozen, extra fields forbidden) and YAML loading with overrides.

``load_recipe(path, overrides=["privacy.epsilon=2"])`` parses with ``yaml.safe_load``, applies dotted
overrides, validates, and reports *all* errors at once, each with the field, the value and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe is invalid; the message lists every problem, one per line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageConfig(_Strict):
    size: int = Field(64, ge=8, le=1024, description="images are resized to size x size")
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
    test_fraction: float = Field(0.25, gt=0, lt=1)
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="share of units held out for validation "
                                       "(model selection in sweeps); 0: none")
    split_seed: int = Field(0, ge=0, description="seed of the train/validation/test split, apart from the "
                                                 "training seed: every run of a sweep shares one split")
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
    r: int = Field(8, ge=1, le=256, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    top_layers: int | None = Field(None, ge=1, description="adapters only in the last K decoder layers (null: all)")
    cache_frozen_layers: bool = Field(True, description="with top_layers: run the frozen layers below once per "
                                                        "record and cache them (exact; Llama-style decoders)")


class ModelConfig(_Strict):
    name: Literal["mlp", "logistic", "cnn", "causal_lm"] = "mlp"
    source: str | None = Field(None, description="causal_lm: builtin:smollm2-135m, a local model directory or a "
                                                 "Hugging Face hub id")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="causal_lm: LoRA adapters (only they train)")
    max_length: int = Field(128, ge=8, le=4096, description="causal_lm: tokens per record incl. the prompt")
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Literal["relu", "tanh", "gelu"] = "tanh"
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64], description="cnn: channels per conv layer")
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2], description="cnn: stride per conv layer")
    groups: int = Field(8, ge=1, description="cnn: GroupNorm groups (never BatchNorm)")
    weight_standardization: bool = Field(False, description="cnn: standardise conv weights (De et al. 2022)")
    fix_batchnorm: bool = Field(False, description="replace BatchNorm with GroupNorm (Opacus ModuleValidator.fix)")


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
    max_physical_batch_size: int = Field(1024, ge=1, description="split larger logical batches into virtual steps")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="opacus: where to train (auto: the CUDA GPU if torch sees one); jax picks its own")


class AuditConfig(_Strict):
    canaries: int = Field(0, ge=0, description="synthetic canaries, each trained on with probability 1/2 (0: none)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence of the empirical lower bound")

    @model_validator(mode="after")
    def _enough(self):
        if 0 < self.canaries < 20:
            raise ValueError(f"privacy.audit.canaries must be 0 (no canary audit) or >= 20, got {self.canaries}; "
                             "an audit with fewer canaries cannot certify anything (use 500-1000)")
        return self


class PrivacyConfig(_Strict):
    epsilon: float | None = Field(None, description="target epsilon; inf = non-private baseline")
    noise_multiplier: float | None = Field(None, ge=0, description="instead of epsilon: a fixed noise multiplier")
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 n) rounded down to a power of 10")
    clipping_norm: float = Field(1.0, gt=0)
    sampling: Literal["poisson", "shuffled"] = "poisson"
    accountant: Literal["pld", "rdp"] = "pld"
    clip_only: bool = Field(False, description="debugging: clip per example but add no noise (NOT private)")
    secure_rng: bool = Field(False, description="draw noise from the OS CSPRNG (slower)")
    dataset_budget: float | None = Field(None, gt=0, description="create a total epsilon budget for all runs on "
                                        "this dataset (kept in $DPTRAIN_HOME/budgets; once it exists every run on the "
                                        "dataset is charged, whether or not its recipe names it)")
    dataset_size: int | None = Field(
        None, ge=1, description="a public, declared number of privacy units: q = batch_size / dataset_size. "
                                "null: the number is estimated with a DP count (Gaussian, count_noise_multiplier) "
                                "composed into the same ledger; the exact count is never used or released")
    count_noise_multiplier: float = Field(20.0, gt=0, description="std of the Gaussian noise of the DP count of "
                                                                  "privacy units (sensitivity 1, add/remove)")
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _one_of(self):
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give privacy.epsilon or privacy.noise_multiplier, not both")
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("give privacy.epsilon (e.g. 8, or inf for the non-private baseline) "
                             "or privacy.noise_multiplier")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"privacy.epsilon must be > 0 (or inf), got {self.epsilon}")
        return self

    @property
    def non_private(self) -> bool:
        return self.epsilon is not None and math.isinf(self.epsilon)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.5, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)


class TrainingConfig(_Strict):
    epochs: float = Field(20, gt=0)
    batch_size: int = Field(256, ge=1, description="expected (logical) batch size")
    augment: Literal["none", "flip_shift"] = Field(
        "none", description="images: random horizontal flip + shift by up to 4 pixels (reflect padding)")
    augmult: int = Field(1, ge=1, le=64, description="augmentation multiplicity K: each unit's gradient is the "
                                                      "mean over K augmentations, clipped once (De et al. 2022)")
    ema: float | None = Field(None, ge=0, lt=1, description="decay of an exponential moving average of the "
                                                            "parameters used for evaluation (e.g. 0.99); null: off")

    @model_validator(mode="after")
    def _augmult(self):
        if self.augmult > 1 and self.augment == "none":
            raise ValueError(f"training.augmult={self.augmult} needs an augmentation: set training.augment: "
                             "flip_shift (or augmult: 1)")
        return self


class GenerationConfig(_Strict):
    top_k: int = Field(50, ge=0, description="sample from the k most likely tokens (0: off)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


class SynthEvaluationConfig(_Strict):
    canaries: int = Field(2, ge=0, description="secret canary sentences per repetition count (0: no exposure test)")
    canary_repetitions: list[int] = Field(default_factory=lambda: [1, 10], description="each canary is inserted "
                                          "this many times into training (Carlini et al. 2019)")
    canary_references: int = Field(2000, ge=10, description="random candidates an exposure is estimated from")
    fidelity_records: int = Field(300, ge=10, description="real held-out records for fidelity (MiniLM embeddings)")
    ngram: int = Field(8, ge=2, description="memorisation: word n-gram length shared with a training record")
    dp_baseline: bool = Field(True, description="also train the downstream classifier on real data with DP")


class SynthesisConfig(_Strict):
    prompt: str = Field("Chest X-ray report ({label}):", description="public template; {label} is the class name")
    records: int = Field(200, ge=1, description="synthetic records to generate")
    label_counts: Literal["dp_histogram", "prior"] = Field(
        "dp_histogram", description="records per label from a DP histogram (accounted) or a declared public prior")
    prior: list[float] | None = Field(None, description="label_counts: prior -- public class weights, one per class")
    histogram_noise_multiplier: float = Field(20.0, gt=0, description="histogram noise std (its L2 sensitivity "
                                                                      "is 1 under add/remove)")
    train_fraction: float | None = Field(None, gt=0, le=1, description="train on this public share of the records: "
                                         "each kept independently (keyed hash of its text < train_fraction)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluation: SynthEvaluationConfig = Field(default_factory=SynthEvaluationConfig)

    @model_validator(mode="after")
    def _checks(self):
        if "{label}" not in self.prompt:
            raise ValueError(f"synthesis.prompt must contain {{label}} (labels condition generation), got {self.prompt!r}")
        if self.label_counts == "prior" and not self.prior:
            raise ValueError("synthesis.label_counts: prior needs synthesis.prior (public class weights, e.g. [0.4, 0.6])")
        if self.prior is not None and (any(not (w >= 0) for w in self.prior) or sum(self.prior) <= 0):
            raise ValueError(f"synthesis.prior must be weights >= 0 with a positive sum, got {self.prior}")
        if any(r < 1 for r in self.evaluation.canary_repetitions):
            raise ValueError("synthesis.evaluation.canary_repetitions must be >= 1")
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
    seed: int = 0

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


def _set_dotted(tree: dict[str, Any], dotted: str) -> None:
    if "=" not in dotted:
        raise RecipeError(f"--set {dotted!r}: expected KEY=VALUE, e.g. --set privacy.epsilon=2")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and value.lower() in {"inf", "+inf", ".inf"}:
        value = math.inf
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "recipe"


def parse_recipe(tree: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc, msg = _loc(err), err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field; check the spelling (see recipes/ for examples)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            value = err.get("input")
            shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"  {loc}: {msg}{shown}")
        raise RecipeError("invalid recipe:\n" + "\n".join(lines)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe: no file at {path}; see recipes/ for ready recipes") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections (data, model, privacy, ...)")
    for o in overrides or []:
        _set_dotted(tree, o)
    return parse_recipe(tree)


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)
