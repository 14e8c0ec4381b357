"""The ``synthesis`` section of a recipe (``dptrain synth``): generation, evaluation, and the method."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from accounting.errors import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from dptrain.config_base import Int, Seed, _finite, _Strict


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


class PrivateEvolutionConfig(_Strict):
    """Private Evolution (:mod:`dptrain.synth.pe`): rounds of DP nearest-candidate votes and variations."""

    rounds: Int = Field(3, ge=1, le=50, description="vote rounds T (each one Gaussian release, composed)")
    oversample: float = _finite(2.0, ge=1, le=20, description="candidates per output record in every population")
    elite_fraction: float = _finite(0.25, ge=0, lt=1, description="share of the next population kept as is: the "
                                                                 "candidates with the most noisy votes")
    threshold: float = _finite(0.0, ge=0, le=10**6, description="noisy votes below this never become parents")
    variation_keep: list[float] = Field(default_factory=lambda: [0.5, 0.65], min_length=1, max_length=50,
                                        description="per round: share of a parent's words kept before the public "
                                                    "model rewrites the rest (the last value repeats)")

    @model_validator(mode="after")
    def _keep(self):
        if any(not (0 < k < 1) for k in self.variation_keep):
            raise ValueError(f"synthesis.private_evolution.variation_keep: shares strictly between 0 and 1, got "
                             f"{self.variation_keep}")
        return self


def fill_prompt(template: str, label: str, topic: str = "") -> str:
    """The public prompt for ``label`` (and ``topic``): ``{label}`` / ``{topic}`` replaced, other braces kept."""
    return template.replace("{label}", label).replace("{topic}", topic)


class SynthesisConfig(_Strict):
    method: Literal["dp_finetune", "private_evolution"] = Field(
        "dp_finetune", description="dp_finetune: DP-SGD on LoRA adapters, then sampling; private_evolution: DP "
                                   "votes of the records on public-model candidates (no gradient on private data)")
    prompt: str = Field("Chest X-ray report ({label}):", description="public template; {label} is the class name")
    topics: dict[str, list[str]] | None = Field(
        None, description="private_evolution: public topics per class name, one drawn per initial candidate into "
                          "{topic} of the prompt (e.g. common findings from a textbook)")
    private_evolution: PrivateEvolutionConfig = Field(default_factory=PrivateEvolutionConfig)
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
        if ("{topic}" in self.prompt) != (self.topics is not None):
            raise ValueError("synthesis.topics: give topics exactly when synthesis.prompt contains {topic}")
        if self.topics is not None and (self.method != "private_evolution"
                                        or any(not v for v in self.topics.values())):
            raise ValueError("synthesis.topics: only for method: private_evolution, with >= 1 topic per class "
                             "(\"\" allowed)")
        if self.method != "private_evolution" and self.private_evolution != PrivateEvolutionConfig():
            raise ValueError("synthesis.private_evolution: only used with synthesis.method: private_evolution; "
                             "remove it or set the method")
        if any(not 1 <= r <= 1000 for r in self.evaluation.canary_repetitions):
            raise ValueError("synthesis.evaluation.canary_repetitions must be >= 1 (and at most 1000)")
        return self
