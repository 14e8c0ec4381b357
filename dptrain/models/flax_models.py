"""Flax (linen) models for the JAX backend, built from layers that support fast per-example clipping.

Every layer here reports its input activations to ``dptrain.trainers.fast_clip`` through ``tap`` (a
no-op outside a fast-clipping pass), so its per-example gradient norms and clipped sums come from
one forward and one backward pass. Parameters of other flax modules still train, through the
slower vmap fallback.

Trainable parameters live in the ``params`` collection; frozen ones (LoRA base weights, frozen
embeddings and heads) in ``frozen``. Initialisation follows PyTorch's defaults (uniform
+-1/sqrt(fan_in) for kernels and biases; N(0, 1) embeddings), so the MLP and logistic regression
start from the same distribution as ``torch_models`` (not the same values).

Each model exposes ``input_shape`` (of one example) and ``input_dtype``; the trainer initialises
parameters from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dptrain.config import ModelConfig
from dptrain.trainers.fast_clip import tap

_ACT = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ---------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------


class Dense(nn.Module):
    """y = x @ kernel + bias on the last axis (any leading axes: batch, sequence, ...)."""

    features: int
    use_bias: bool = True
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kinit = nn.initializers.zeros if self.zero_init else torch_uniform(d)
        kernel = self.param("kernel", kinit, (d, self.features))
        y = jnp.dot(x, kernel)
        names = ("kernel",)
        if self.use_bias:
            y = y + self.param("bias", torch_uniform(d), (self.features,))
            names += ("bias",)
        return tap(self, "dense", y, (x,), names)


class Conv(nn.Module):
    """2-D convolution, NHWC / HWIO, no dilation or groups."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(cin * kh * kw), (kh, kw, cin, self.features))
        y = lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        names = ("kernel",)
        if self.use_bias:
            y = y + self.param("bias", torch_uniform(cin * kh * kw), (self.features,))
            names += ("bias",)
        return tap(self, "conv", y, (x,), names, kernel_size=tuple(self.kernel_size),
                   strides=tuple(self.strides), padding=self.padding)


class Embed(nn.Module):
    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, idx):
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_embeddings, self.features))
        return tap(self, "embed", jnp.take(table, idx, axis=0), (idx,), ("embedding",))


def _affine(module, xhat, use_scale: bool, use_bias: bool):
    c = xhat.shape[-1]
    y, names = xhat, ()
    if use_scale:
        y = y * module.param("scale", nn.initializers.ones, (c,))
        names += ("scale",)
    if use_bias:
        y = y + module.param("bias", nn.initializers.zeros, (c,))
        names += ("bias",)
    return tap(module, "affine", y, (xhat,), names) if names else y


class GroupNorm(nn.Module):
    """GroupNorm over channels-last inputs (per example: safe for DP, unlike BatchNorm). As torch's."""

    num_groups: int
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: channels {c} not divisible by num_groups {g}")
        spatial = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // g)

        def group_mean(per_channel_sum):  # (B, C) -> the mean of each channel's group, broadcastable to x
            m = per_channel_sum.reshape(b, g, c // g).sum(-1, keepdims=True) / count
            return jnp.broadcast_to(m, (b, g, c // g)).reshape(b, *(1,) * len(spatial), c)

        # per-channel sums over the contiguous spatial axes, then groups: much faster in XLA (CPU) than a
        # reduction over (spatial, channel-in-group) axes; two passes (centred variance), as torch
        mean = group_mean(x.sum(spatial))
        centred = x - mean
        rstd = lax.rsqrt(group_mean(jnp.square(centred).sum(spatial)) + self.epsilon)
        xhat = centred * rstd
        return _affine(self, xhat, self.use_scale, self.use_bias)


class LayerNorm(nn.Module):
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return _affine(self, (x - mean) * lax.rsqrt(var + self.epsilon), self.use_scale, self.use_bias)


def _frozen(module, name: str, init, shape):
    return module.variable("frozen", name, lambda: init(module.make_rng("params"), shape)).value


class LoRADense(nn.Module):
    """Frozen base Dense plus a trainable low-rank adapter: y = x W0 + b0 + (alpha / r) (x A) B.

    A and B are two tapped Dense layers (``lora_a``, ``lora_b``), so the adapter's per-example norms
    are ghost/direct norms of two small Dense layers; B starts at zero (the adapter starts as a no-op).
    """

    features: int
    rank: int = 8
    alpha: float = 16.0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        y = jnp.dot(x, _frozen(self, "kernel", torch_uniform(d), (d, self.features)))
        if self.use_bias:
            y = y + _frozen(self, "bias", torch_uniform(d), (self.features,))
        h = Dense(self.rank, use_bias=False, name="lora_a")(x)
        return y + (self.alpha / self.rank) * Dense(self.features, use_bias=False, zero_init=True, name="lora_b")(h)


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """in_features -> hidden... -> num_classes logits (no hidden layers: logistic regression)."""

    in_features: int
    num_classes: int
    hidden: Sequence[int] = ()
    activation: str = "tanh"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    input_dtype = "float32"

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = _ACT[self.activation](Dense(h)(x))
        return Dense(self.num_classes)(x)


def max_pool2(x):
    """2x2 max pooling, stride 2, floor (odd edges dropped, as torch's MaxPool2d(2)), NHWC. A reshape and a max:
    XLA's CPU backward of ``reduce_window`` max (select-and-scatter) is far slower."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
    """28x28x1 images: conv16-GN-relu-pool, conv32-GN-relu-pool, dense (GroupNorm, never BatchNorm)."""

    num_classes: int = 10
    height: int = 28
    width: int = 28
    channels: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.height, self.width, self.channels)

    input_dtype = "float32"

    @nn.compact
    def __call__(self, x):
        for feats, groups in ((16, 4), (32, 8)):
            x = jax.nn.relu(GroupNorm(groups)(Conv(feats)(x)))
            x = max_pool2(x)
        return Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class WSConv(nn.Module):
    """Conv with weight standardisation (per output channel). No fast-clipping tap: the jax backend's
    ``auto`` clipping falls back to vmap per-example gradients for its kernel."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(cin * kh * kw), (kh, kw, cin, self.features))
        mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
        var = jnp.square(kernel - mean).mean(axis=(0, 1, 2), keepdims=True)
        kernel = (kernel - mean) * lax.rsqrt(var + 1e-5)
        y = lax.conv_general_dilated(x, kernel, self.strides, self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.param("bias", torch_uniform(cin * kh * kw), (self.features,))


class ImageCNN(nn.Module):
    """The flax twin of the MONAI ``Classifier`` of ``torch_models.build_cnn``: conv(stride, SAME)-GroupNorm-ReLU
    blocks, a last conv without norm/activation, flatten, dense. Takes NCHW input (as the torch model)."""

    in_shape: tuple[int, int, int] = (1, 64, 64)
    num_classes: int = 2
    channels: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    groups: int = 8
    weight_standardization: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.in_shape)

    input_dtype = "float32"

    @nn.compact
    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1))
        last = len(self.channels) - 1
        for i, (feats, s) in enumerate(zip(self.channels, self.strides, strict=True)):
            conv = WSConv if self.weight_standardization else Conv
            kw = {} if self.weight_standardization else {"padding": "SAME"}
            x = conv(feats, (3, 3), strides=(s, s), **kw)(x)
            if i < last:
                x = jax.nn.relu(GroupNorm(self.groups)(x))
        return Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class LoRATransformer(nn.Module):
    """One pre-LN transformer block over token ids, LoRA on q/k/v/o and both MLP projections.

    Only the LoRA adapters are trainable (``params``); embeddings, base weights and the classification
    head are frozen (``frozen``). Layer norms have no affine parameters. Mean-pooled output -> logits.
    """

    vocab: int = 256
    seq_len: int = 64
    d_model: int = 128
    heads: int = 4
    mlp: int = 256
    rank: int = 8
    num_classes: int = 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    input_dtype = "int32"

    @nn.compact
    def __call__(self, tokens):
        d, nh = self.d_model, self.heads
        emb = _frozen(self, "embedding", nn.initializers.normal(1.0), (self.vocab, d))
        pos = _frozen(self, "position", nn.initializers.normal(0.02), (self.seq_len, d))
        h = jnp.take(emb, tokens, axis=0) + pos[: tokens.shape[1]]
        x = LayerNorm(use_scale=False, use_bias=False)(h)
        b, t, _ = x.shape
        q, k, v = (LoRADense(d, self.rank, name=n)(x).reshape(b, t, nh, d // nh) for n in ("q", "k", "v"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // nh), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        h = h + LoRADense(d, self.rank, name="o")(o)
        x = LayerNorm(use_scale=False, use_bias=False)(h)
        h = h + LoRADense(d, self.rank, name="fc2")(jax.nn.gelu(LoRADense(self.mlp, self.rank, name="fc1")(x)))
        pooled = LayerNorm(use_scale=False, use_bias=False)(h).mean(axis=1)
        head = _frozen(self, "head", torch_uniform(d), (d, self.num_classes))
        return pooled @ head


def build_flax_model(cfg: ModelConfig, in_features: int | tuple[int, ...], num_classes: int) -> nn.Module:
    """Logits model like ``build_torch_model``: ``in_features`` (tables) or an image shape (C, H, W)."""
    if cfg.name == "cnn":
        if isinstance(in_features, int):
            raise ValueError("model.name: cnn needs image data (data.image or builtin:br35h); use mlp for tables")
        return ImageCNN(tuple(in_features), num_classes, tuple(cfg.channels), tuple(cfg.strides), cfg.groups,
                        cfg.weight_standardization)
    if not isinstance(in_features, int):
        raise ValueError(f"model.name: {cfg.name} is for tables; use model.name: cnn for images")
    if cfg.name == "logistic":
        return MLP(in_features, num_classes, hidden=())
    if cfg.name == "mlp":
        return MLP(in_features, num_classes, hidden=tuple(cfg.hidden), activation=cfg.activation)
    raise ValueError(f"model.name: expected 'mlp' or 'logistic', got {cfg.name!r}")
