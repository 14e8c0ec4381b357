"""The recipe schema's value types and limits (pydantic), shared by :mod:`dptrain.config` and
:mod:`dptrain.config_synth`."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_SEED = 2**32 - 1  # numpy, torch and jax all accept seeds in [0, 2**32 - 1]
MAX_WIDTH = 65536  # widest hidden layer / most conv channels: a wider one is a typo (and allocates gigabytes)
MAX_CANARIES = 100_000  # each canary is an extra training unit: beyond ~1e5 steps and memory grow for nothing
#                         (an audit certifies nothing more past ~1000 canaries at delta 1e-5; see README)
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
