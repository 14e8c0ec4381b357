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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from accounting.errors import MAX_NOISE_MULTIPLIER, MAX_TARGET_EPSILON, MIN_NOISE_MULTIPLIER
from dptrain.config_base import (  # noqa: F401  (re-exported: the recipe's value types)
    MAX_CANARIES,
    MAX_SEED,
    MAX_WIDTH,
    Int,
    Seed,
    Width,
    _finite,
    _integral,
    _Strict,
)
from dptrain.config_data import (
    DpBoundsConfig,
    check_dp_bounds,
    check_numeric,
    declared_words,
    numeric_range,
)
from dptrain.config_model import MODEL_FIELDS, LoraConfig, ModelConfig  # noqa: F401
from dptrain.config_synth import GenerationConfig, SynthesisConfig, SynthEvaluationConfig  # noqa: F401
from dptrain.recipe_yaml import RecipeDumper, RecipeError, YAMLLimit, validation_message
from dptrain.recipe_yaml import read_recipe_text as _recipe_text
from dptrain.recipe_yaml import read_yaml as _read_yaml
from dptrain.recipe_yaml import yaml_problem as _yaml_problem


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


BOOLEAN_RULE = ("booleans are spelled True / False: a file value true / True / TRUE (any case), a YAML true / false and "
                "a quoted \"true\" all match; 1 / 0 and yes / no are values of their own")
Value = str | int | bool


class MissingRule(_Strict):
    """What is done with a missing value of one feature (``data.missing``): a public declaration, never a statistic
    of the data. Written ``refuse``, ``indicator``, ``category``, ``{fill: VALUE}``, ``{fill: VALUE, indicator: true}``
    or ``{category: NAME}``; stored as ``rule`` (+ ``fill`` / ``category``)."""

    rule: Literal["refuse", "fill", "indicator", "category"]
    fill: float | str | bool | None = None
    category: Value | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        forms = "write refuse, indicator, category, {fill: VALUE}, {fill: VALUE, indicator: true} or {category: NAME}"
        if isinstance(v, str):
            if v not in ("refuse", "indicator", "category"):
                raise ValueError(f"unknown rule {v!r}; {forms}")
            return {"rule": v}
        if isinstance(v, dict) and "rule" not in v:
            v = dict(v)
            indicator = v.pop("indicator", False)
            if not isinstance(indicator, bool) or set(v) - {"fill", "category"} or ("fill" in v and "category" in v) \
                    or ("category" in v and indicator) or not (v or indicator):
                raise ValueError(forms)
            rule = "category" if "category" in v else "indicator" if indicator else "fill"
            return {"rule": rule, **v}
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if (self.rule == "fill") != (self.fill is not None) and self.rule != "indicator":
            raise ValueError("fill: VALUE goes with the rules fill and indicator only")
        if self.rule != "category" and self.category is not None:
            raise ValueError("category: NAME goes with the rule category only")
        if isinstance(self.fill, float) and not math.isfinite(self.fill):
            raise ValueError("fill must be a finite number or a category")
        return self


class DataConfig(_Strict):
    source: str = Field(description="builtin:NAME, a path to a .csv / .parquet file, or a database URL "
                                    "(sqlite:///PATH, duckdb:///PATH, postgresql://HOST/DB; no password) read "
                                    "with data.query")
    query: str | None = Field(None, description="SQL query whose result is the table: required when data.source "
                                                "is a database URL, refused otherwise; run read-only "
                                                "(dptrain.data.sql)")
    label: str | None = Field(None, description="label column (built-ins have a default)")
    positive_label: Value | list[Value] | None = Field(
        None, description="value of the label that counts as positive, or a list of them ([1, 2, 3, 4]); labels "
                          f"and categories are compared as written in the file ({BOOLEAN_RULE})")
    label_threshold: float | None = _finite(None, description="instead of positive_label: a numeric label above "
                                            "this value is positive (0: '> 0' is positive)")
    numeric: dict[str, list[float] | Literal["dp"]] | None = Field(
        None, description="numeric feature -> declared public bounds [low, high] (values are clipped to them), or dp: "
                          "DP-estimated bounds within data.dp_bounds.range (composed into the run's ledger)")
    dp_bounds: DpBoundsConfig | None = Field(None, description="the public ranges and settings of dp bounds")
    categorical: dict[str, list[Value]] | None = Field(
        None, description=f"categorical feature -> declared public list of categories (one-hot; {BOOLEAN_RULE})")
    missing: dict[str, MissingRule] | None = Field(
        None, description="feature (or 'default', for every feature not named) -> what a missing value becomes: "
                          "refuse (the default), {fill: VALUE} (a declared number within the bounds, or a declared "
                          "category), indicator (numeric: adds a 0/1 column NAME_missing and fills with the declared "
                          "fill or the bounds' midpoint; categorical: as category), category / {category: NAME} "
                          "(categorical: missing is the category NAME, default 'missing', added if not declared); "
                          "never a statistic of the data")
    sensitive: list[str] | None = Field(None, description="sensitive attributes kept for fairness reports")
    privacy_unit: str | None = Field(None, description="column identifying a patient; null = per example")
    test_fraction: float = _finite(0.25, gt=0, lt=1)
    validation_fraction: float = _finite(0.0, ge=0, lt=1, description="share of units held out for validation "
                                         "(model selection in sweeps); 0: none")
    split_seed: Int = Field(0, ge=0, le=MAX_SEED, description="seed of the train/validation/test split, apart "
                            "from the training seed: every run of a sweep shares one split (0 to 2**32 - 1)")
    classes: list[Value] | None = Field(
        None, description="declared class names (public), in label order; required where the labels are not "
                          "described by positive_label or a built-in's public metadata (text labels, MedMNIST)")
    id: str | None = Field(None, description="dataset identity for the dataset budget (default: the built-in's "
                                             "name, or a content hash of the source file)")
    image: ImageConfig | None = Field(None, description="set for image data: a manifest CSV, a MedMNIST .npz, "
                                                        "or a built-in image dataset")
    text: str | None = Field(None, description="text data (dptrain synth): the text column of a CSV / JSONL file "
                                               "(default 'text')")
    _dp_source: Any = PrivateAttr(None)  # dptrain.data.dp_bounds.attach: the released dp bounds, or the noise to draw

    @staticmethod
    def is_database_url(source: str) -> bool:
        """True when ``source`` is a URL (``SCHEME://...``): a database read with ``data.query``."""
        scheme, sep, _ = source.partition("://")
        return bool(sep) and scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)

    @staticmethod
    def masked_url(text: str) -> str:
        """``text`` with every URL password (``user:PASSWORD@host``, ``password=...``) replaced by ``***``."""
        import re

        text = re.sub(r"([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):[^\s'\"]*@", r"\1:***@", text)
        return re.sub(r"(?i)\b(password|passwd|pwd)=[^&;\s'\"]*", r"\1=***", text)

    @model_validator(mode="after")
    def _database(self):
        """``data.query`` exactly with a database URL; no password in the recipe (it is written to release/)."""
        import re

        shown = self.masked_url(self.source)
        if not self.is_database_url(self.source):
            if self.query is not None:
                raise ValueError(f"data.query: set, but data.source {shown!r} is not a database URL; fix: remove "
                                 "data.query, or give a database URL (sqlite:///PATH, duckdb:///PATH, "
                                 "postgresql://HOST/DB) in data.source")
            return self
        kind = self.source.partition("://")[0].partition("+")[0].lower()
        if kind not in ("sqlite", "duckdb", "postgresql"):
            raise ValueError(f"data.source: {shown!r} is a URL of kind {kind!r}, which dptrain does not read; fix: "
                             "use sqlite:///PATH, duckdb:///PATH or postgresql://HOST/DB with data.query, or a local "
                             ".csv / .parquet file")
        if shown != self.source:
            raise ValueError(f"data.source: {shown!r} holds a password, which would be written to release/config.yaml "
                             "and the run record; fix: remove it from the URL and give it to the driver outside the "
                             "recipe (PostgreSQL: the PGPASSWORD environment variable or ~/.pgpass)")
        if self.query is None or not self.query.strip():
            raise ValueError(f"data.query: {'missing' if self.query is None else 'empty'} for the database source "
                             f"{shown!r}; fix: add data.query: SELECT ... FROM ... ORDER BY ...")
        if self.image is not None or self.text is not None:
            raise ValueError("data.query: tables only (data.image and data.text read files); fix: remove data.image "
                             "/ data.text, or export the manifest / texts to a file")
        if self.privacy_unit is None and not re.search(r"(?i)\border\s+by\b", self.query):
            raise ValueError("data.query: no ORDER BY, and without a data.privacy_unit the train / test split is by "
                             "row position, which a database may change from one read to the next; fix: end the "
                             "query with ORDER BY a unique column (e.g. ORDER BY record_id), or set "
                             "data.privacy_unit")
        return self

    @model_validator(mode="after")
    def _fractions(self):
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(f"data.test_fraction + data.validation_fraction must be < 1, got "
                             f"{self.test_fraction} + {self.validation_fraction}")
        return self

    @model_validator(mode="after")
    def _labels_and_missing(self):
        if self.label_threshold is not None and (self.positive_label is not None or self.classes is not None):
            raise ValueError("data.label_threshold replaces data.positive_label and data.classes; keep one of them")
        if isinstance(self.positive_label, list) and not self.positive_label:
            raise ValueError("data.positive_label is an empty list; list the label values that count as positive")
        not_table = self.text is not None or self.source.lower().endswith((".npz", ".jsonl"))
        if (isinstance(self.positive_label, list) and (not_table or (self.image and self.source.startswith("builtin:")))
                or self.label_threshold is not None and (not_table or self.image is not None)):
            raise ValueError("a list data.positive_label (tables, image manifests) and data.label_threshold (tables) "
                             "are not read for this data; give one positive_label")
        rules = self.missing or {}
        if "default" in rules and rules["default"].rule not in ("refuse", "indicator"):
            raise ValueError(f"data.missing.default must be refuse or indicator, got {rules['default'].rule}")
        numeric, categorical = self.numeric or {}, self.categorical or {}
        if not self.source.startswith("builtin:"):
            unknown = sorted(set(rules) - set(numeric) - set(categorical) - {"default"})
            if unknown:
                raise ValueError(f"data.missing names {unknown}, which are not declared features (data.numeric / "
                                 "data.categorical); name a feature, or 'default' for all")
        for name, r in rules.items():
            if name in numeric and r.rule == "category":
                raise ValueError(f"data.missing.{name}: category is for categorical features; use indicator or "
                                 "{fill: NUMBER}")
            if name in numeric and r.fill is not None:
                lo, hi = numeric_range(numeric, self.dp_bounds, name)
                if isinstance(r.fill, str | bool) or not lo <= r.fill <= hi:
                    raise ValueError(f"data.missing.{name}: fill {r.fill!r} must be a number within the declared "
                                     f"bounds [{lo}, {hi}]")
        return self

    @field_validator("numeric", "categorical", mode="before")
    @classmethod
    def _words(cls, v, info):
        return declared_words(v, info.field_name)

    @field_validator("numeric")
    @classmethod
    def _bounds(cls, v):
        return check_numeric(v)

    @model_validator(mode="after")
    def _dp_ranges(self):
        check_dp_bounds(self.numeric, self.dp_bounds)
        return self


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
    grad_sample_mode: Literal["hooks", "ghost", "auto"] = Field(
        "hooks", description="opacus: per-sample hooks, ghost clipping, or auto (ghost where it is cheaper: MLPs)")
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
        if self.model.name == "pretrained" and self.trainer.backend != "opacus":
            raise ValueError("trainer.backend: model.name: pretrained (a public backbone) runs on the opacus backend "
                             "(its frozen features are computed once per image there); set trainer.backend: opacus")
        if lm:  # options of `dptrain train` that dptrain synth does not implement: refuse, never ignore
            unsupported = {
                "data.privacy_unit": self.data.privacy_unit is not None,
                "privacy.audit.canaries (synthesis.evaluation.canaries measures exposure instead)":
                    self.privacy.audit.canaries > 0,
                "training.augment": self.training.augment != "none", "training.augmult": self.training.augmult > 1,
                "training.ema": self.training.ema is not None, "data.image": self.data.image is not None,
            }
            if self.synthesis.method == "private_evolution":  # no training: training options would be ignored
                unsupported.update({
                    "training (private_evolution trains nothing)": self.training != TrainingConfig(),
                    "optimizer": self.optimizer != OptimizerConfig(), "model.lora": self.model.lora != LoraConfig(),
                    "privacy.clipping_norm (each vote has norm 1)": self.privacy.clipping_norm != 1.0})
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(f"dptrain synth does not support {', '.join(bad)} yet (the guarantee is per "
                                 "record); remove them from the recipe")
        return self


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


def parse_recipe(tree: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe tree; ``source`` (the file) is named in the error."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(validation_message(exc, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    text = _recipe_text(path)
    try:
        tree = _read_yaml(text)
    except YAMLLimit as err:
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
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False)
