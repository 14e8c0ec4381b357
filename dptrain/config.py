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
    image: ImageConfig | None = Field(None, description="set for image data: a manifest CSV, a MedMNIST .npz, "
                                                        "or a built-in image dataset")

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


class ModelConfig(_Strict):
    name: Literal["mlp", "logistic", "cnn"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Literal["relu", "tanh", "gelu"] = "tanh"
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64], description="cnn: channels per conv layer")
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2], description="cnn: stride per conv layer")
    groups: int = Field(8, ge=1, description="cnn: GroupNorm groups (never BatchNorm)")
    weight_standardization: bool = Field(False, description="cnn: standardise conv weights (De et al. 2022)")
    fix_batchnorm: bool = Field(False, description="replace BatchNorm with GroupNorm (Opacus ModuleValidator.fix)")


class TrainerConfig(_Strict):
    backend: Literal["opacus", "jax"] = "opacus"
    grad_sample_mode: Literal["hooks", "ghost"] = Field("hooks", description="opacus: per-sample hooks or ghost clipping")
    clipping: Literal["auto", "vmap"] = Field(
        "auto", description="jax: fast per-layer clipping where possible (auto) or vmap per-example gradients")
    max_physical_batch_size: int = Field(1024, ge=1, description="split larger logical batches into virtual steps")


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
    dataset_budget: float | None = Field(None, gt=0, description="total epsilon for all runs on this dataset")
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
    eval_every_epochs: float = Field(1.0, gt=0)
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


class Recipe(_Strict):
    name: str = "run"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    privacy: PrivacyConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = 0


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
