"""The recipe's ``model`` section (pydantic), re-exported by :mod:`dptrain.config`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from dptrain.config_base import MAX_WIDTH, Int, Width, _Strict


class LoraConfig(_Strict):
    r: Int = Field(8, ge=1, le=256, description="LoRA rank")
    alpha: Int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r)")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    top_layers: Int | None = Field(None, ge=1, le=1024, description="adapters only in the last K decoder layers "
                                                                    "(null: all)")
    cache_frozen_layers: bool = Field(True, description="with top_layers: run the frozen layers below once per "
                                                        "record and cache them (exact; Llama-style decoders)")


class ModelConfig(_Strict):
    name: Literal["mlp", "logistic", "cnn", "pretrained", "causal_lm"] = "mlp"
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
    backbone: str = Field("builtin:efficientnet-lite0", min_length=1, max_length=4096,
                          description="pretrained: public weights: builtin:efficientnet-lite0 or the path of an "
                                      "EfficientNet-Lite0 state dict (.pth); see dptrain.models.backbones")
    finetune: Literal["head", "all"] = Field("head", description="pretrained: train the linear head only (the "
                                                                 "backbone frozen) or every layer")
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
                "pretrained": {"backbone", "finetune"},
                "causal_lm": {"source", "lora", "max_length"}}
