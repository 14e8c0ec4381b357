"""This process's place in a run, without torch: :class:`ProcessContext` and the single-process ``LOCAL``.

:class:`ProcessContext` is what trainers and the run lifecycle talk to (rank, world size, ``on_main``, the
collectives). In a single process (``LOCAL``) every collective is a no-op and nothing here imports torch or
jax, so a JAX run, or ``import dptrain.run``, works without torch. The data-parallel implementation
(torch.distributed, launched with torchrun) is :class:`dptrain.trainers.distributed.Distributed`;
:func:`dptrain.trainers.launch.from_env` imports it only when the environment describes several processes or a
torch process group is initialised.

Sharp edge: a bare ``ProcessContext`` with ``world_size > 1`` has no collectives and refuses to pretend (every
collective raises RuntimeError); build data-parallel contexts with ``launch.from_env`` or ``Distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed; this rank stops with it (the failing rank reports the cause)."""


@dataclass(frozen=True)
class ProcessContext:
    """This process's place in a data-parallel run; ``LOCAL`` (world size 1) is the single-process run.

    ``owns_group``: this object initialised the default process group and destroys it in ``close``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"distributed: expected 0 <= rank < world_size, got rank {self.rank}, "
                             f"world_size {self.world_size}")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, units: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows this rank processes: those whose unit % world_size == rank."""
        return np.asarray(units) % self.world_size == self.rank

    # ---- collectives: no-ops in a single process; implemented by dptrain.trainers.distributed.Distributed ----
    def _no_collectives(self) -> None:
        if self.active:
            raise RuntimeError(f"{type(self).__name__} with world_size {self.world_size} has no collectives; use "
                               "dptrain.trainers.launch.from_env or dptrain.trainers.distributed.Distributed")

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled between ranks: for small values, never per-step data)."""
        self._no_collectives()
        return obj

    def broadcast_(self, tensor: Any) -> Any:
        """Overwrite ``tensor`` (a torch tensor) in place with rank 0's."""
        self._no_collectives()
        return tensor

    def sum_(self, tensors: Sequence[Any]) -> None:
        """All-reduce (SUM) the torch ``tensors`` in place."""
        self._no_collectives()

    def barrier(self) -> None:
        self._no_collectives()

    def on_main(self, fn: Callable[[], T], *, share: bool = True) -> T | None:
        """Run ``fn`` on rank 0 only (file I/O) and give every rank its result, or make every rank fail.

        The error is re-raised as itself on rank 0 and as ``DistributedError`` elsewhere, so no rank is
        left waiting in a collective the others never enter. ``share=False``: the result stays on rank 0
        (others get None); only success or failure is broadcast."""
        if not self.active:
            return fn()
        result, failure, error = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error, failure = err, f"{type(err).__name__}: {err}"
        failure, shared = self.broadcast_object((failure, result if share else None))
        if error is not None:
            raise error
        if failure is not None:
            raise DistributedError(f"rank {self.rank}: stopping because rank 0 failed ({failure})")
        return result if self.is_main else shared

    def close(self, *, ok: bool) -> None:
        """End of the run (data-parallel: wait for every rank, leave the process group if owned)."""
        self._no_collectives()


LOCAL = ProcessContext()


__all__ = ["LOCAL", "DistributedError", "ProcessContext"]
