"""Data-parallel DP training across processes (torch.distributed, launched with torchrun).

The accounted mechanism is the single-process one, run by ``world_size`` processes together:

- every rank holds the same secret ``dp_seed`` (drawn by rank 0 and broadcast, or read from the checkpoint by
  rank 0 and broadcast on resume), so every rank's counter-based sampler draws the same *global* Poisson batch;
- each rank clips only its share of that batch, the rows whose privacy unit satisfies
  ``unit % world_size == rank``: a unit is never split across ranks, so per-unit clipping is intact;
- the clipped sums are all-reduced (SUM) and the Gaussian noise is added *once*: every rank draws the identical
  noise (same seeded generator; with ``secure_rng`` rank 0 draws from the OS and broadcasts), so the sum is
  normalised by the *global* expected batch size and all ranks take the identical optimiser step.

Formal guarantee: the released parameters are those of the single-process run on the same global batches
(up to floating-point summation order), so the single-process privacy statement holds unchanged.

Sharp edges:

- every collective must be entered by every rank. Steps that touch the run directory run on rank 0 only,
  through :meth:`Distributed.on_main`, which broadcasts rank 0's result *or its error* so that all ranks
  continue or stop together. A rank that dies mid-training (out of memory) leaves the others blocked in the
  next all-reduce until the launcher stops them (torchrun does so when any worker fails).
- with ``secure_rng`` the sampler's coins come from the OS and would differ per rank: rank 0 samples and
  broadcasts the rows (:class:`BroadcastSampler`).
- each rank materialises (and augments) the whole global batch; the share split happens in the trainer.
- only rank 0 touches files, so ranks need no shared filesystem.
- the world size is not part of the mechanism: a run may resume with another number of processes.
- shares are not balanced (unit ids modulo world_size): per step, ranks get different numbers of rows.

This module imports torch; single-process code uses :mod:`dptrain.trainers.context` (``LOCAL``, ``from_env``),
which imports this module only when the environment describes several processes. ``LOCAL`` and
``DistributedError`` are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from dptrain.trainers.context import LOCAL, DistributedError, ProcessContext
from dptrain.trainers.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed(ProcessContext):
    """A process of a torch.distributed run (see the module docstring); with world size 1 its collectives are
    no-ops, as ``LOCAL``'s. Rank, share and ``on_main`` are :class:`~dptrain.trainers.context.ProcessContext`'s."""

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled: for small values, never per-step data)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank 0's."""
        if self.active:
            torch.distributed.broadcast(tensor, src=0)
        return tensor

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (SUM) ``tensors`` in place, flattened into one buffer per dtype (one collective each)."""
        if not self.active or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self, *, ok: bool) -> None:
        """End of the run: wait for every rank (only when all got here normally: a failed rank may be
        elsewhere), then destroy the process group if this object created it."""
        if not self.active:
            return
        if ok:
            torch.distributed.barrier()
        if self.owns_group:
            torch.distributed.destroy_process_group()


def from_env(device: str = "auto", *, env: dict[str, str] | None = None) -> ProcessContext:
    """This process's context: the process group the caller initialised (used as is, left up), else the one
    torchrun describes (WORLD_SIZE > 1, RANK, LOCAL_RANK, MASTER_ADDR/PORT; initialised here: gloo for a CPU
    trainer, NCCL with GPU ``LOCAL_RANK`` for a CUDA one, destroyed by ``close``), else ``LOCAL``.

    Sharp edge: one owned group per process. Re-initialising after ``close`` in the same torchrun worker
    reuses the launcher's store keys and may fail; initialise the group yourself to call ``train`` twice."""
    env = dict(os.environ) if env is None else env
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return LOCAL
    rank = dist.get_rank() if initialised else int(env["RANK"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    if initialised and "WORLD_SIZE" in env and (int(env["WORLD_SIZE"]), int(env.get("RANK", rank))) != (world, rank):
        raise ValueError(f"distributed: the process group has world size {world} and rank {rank}, the "
                         f"environment says {env['WORLD_SIZE']} and {env.get('RANK')}")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"distributed: LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} "
                             "GPU(s); start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    if initialised:
        backend = dist.get_backend()
        if backend == "nccl" and not cuda:
            raise ValueError("distributed: the process group uses NCCL but the trainer runs on the CPU; "
                             "initialise a gloo group or set trainer.device: cuda")
        return Distributed(rank, world, local_rank, backend, owns_group=False)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", world_size=world, rank=rank,
                            **({"device_id": torch.device("cuda", local_rank)} if cuda else {}))
    return Distributed(rank, world, local_rank, backend, owns_group=True)


class BroadcastSampler:
    """A sampler whose rows rank 0 draws and broadcasts (for ``secure_rng``, whose OS coins differ per rank).

    Same interface as :class:`~dptrain.trainers.sampler.UnitSampler` for THE loop: ``sample(step)``."""

    def __init__(self, sampler: Any, dist: Distributed):
        self.inner, self.dist = sampler, dist

    def sample(self, step: int) -> np.ndarray:
        rows = self.inner.sample(step) if self.dist.is_main else None
        n = torch.tensor([len(rows) if rows is not None else 0], dtype=torch.int64, device=self.dist._device())
        self.dist.broadcast_(n)
        if int(n.item()) == 0:
            return np.zeros(0, dtype=np.int64)
        buf = (torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)) if self.dist.is_main
               else torch.empty(int(n.item()), dtype=torch.int64)).to(self.dist._device())
        self.dist.broadcast_(buf)
        return buf.cpu().numpy()


__all__ = ["LOCAL", "BroadcastSampler", "Distributed", "DistributedError", "from_env"]
