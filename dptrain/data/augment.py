"""Image augmentation for DP training, with augmentation multiplicity (De et al. 2022).

``make_augmenter(kind, multiplicity, seed)`` returns ``augment(batch, step) -> batch`` for the loop: each
row becomes ``multiplicity`` randomly augmented copies with the same privacy unit and weight 1/K, so the
backend's per-unit summed gradient is the mean over the K augmentations, clipped once. Clipping bounds a
unit's contribution whatever the augmentations are, so the randomness needs no secrecy; it is
counter-based on (seed, step), so a resumed run replays it exactly.

``flip_shift``: horizontal flip with probability 1/2, then a shift by up to 4 pixels in each direction with
reflect padding (images of shape (n, C, H, W)).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dptrain.values import Batch

PAD = 4


def flip_shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    flip = rng.random(n) < 0.5
    out = np.where(flip[:, None, None, None], x[..., ::-1], x)
    padded = np.pad(out, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)), mode="reflect")
    dy, dx = rng.integers(0, 2 * PAD + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]           # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]           # (n, w)
    idx = np.arange(n)[:, None, None]
    res = padded.transpose(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (n, h, w, C)
    return np.ascontiguousarray(res.transpose(0, 3, 1, 2)).astype(x.dtype, copy=False)


def make_augmenter(kind: str, multiplicity: int, seed: int) -> Callable[[Batch, int], Batch] | None:
    if kind == "none":
        return None
    if kind != "flip_shift":
        raise ValueError(f"training.augment: unknown {kind!r}; use none or flip_shift")

    def augment(batch: Batch, step: int) -> Batch:
        if len(batch) == 0:
            return batch
        if batch.x.ndim != 4:
            raise ValueError(f"training.augment: {kind} needs images (n, C, H, W), got {batch.x.ndim}-D inputs; "
                             "set training.augment: none for tables")
        rng = np.random.default_rng([seed, 7, step])
        k = multiplicity
        x = np.concatenate([flip_shift(batch.x, rng) for _ in range(k)])
        w = None if k == 1 else np.full(len(x), 1.0 / k, np.float32)
        return Batch(x, np.tile(batch.y, k), np.tile(batch.units, k), w)

    return augment
