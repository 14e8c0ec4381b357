"""Which process context a run gets: ``LOCAL``, or the torch.distributed one when torchrun started several.

Guarantee: in a single process nothing here imports torch (a JAX run never needs it); the torch implementation
(:mod:`dptrain.trainers.distributed`) is imported only when the environment describes several processes
(WORLD_SIZE > 1) or the caller has already initialised a torch process group.
"""

from __future__ import annotations

import os
import sys

from dptrain.trainers.context import LOCAL, ProcessContext


def from_env(device: str = "auto", *, env: dict[str, str] | None = None) -> ProcessContext:
    """``LOCAL``, or :func:`dptrain.trainers.distributed.from_env`'s context (which joins or creates the process
    group). A ValueError says what is wrong with the environment (e.g. WORLD_SIZE > 1 without torch)."""
    env = dict(os.environ) if env is None else env
    dist = sys.modules.get("torch.distributed")  # a group can be initialised only if the caller imported it
    initialised = dist is not None and dist.is_available() and dist.is_initialized()
    try:
        world = int(env.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise ValueError(f"distributed: WORLD_SIZE must be an integer, got {env['WORLD_SIZE']!r}") from None
    if not initialised and world <= 1:
        return LOCAL
    try:
        from dptrain.trainers import distributed
    except ImportError as err:
        raise ValueError(f"distributed: WORLD_SIZE={world} needs torch ({err}); install torch or run one "
                         "process") from None
    return distributed.from_env(device, env=env)


__all__ = ["from_env"]
