"""torch.distributed helpers: process-group setup for torchrun, rank queries and gathers with gradients.

Launch a multi-process run with ``torchrun --nproc_per_node N -m aladin_fast.training train ...``:
:func:`init_distributed` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the
environment and joins the group with ``nccl`` on CUDA or ``gloo`` on CPU. The
:class:`~aladin_fast.training.Trainer` then wraps its models in DDP, shards the
data with a ``DistributedSampler``, and only rank 0 logs, evaluates and writes
checkpoints.

:func:`all_gather_with_grad` concatenates a tensor from every rank along dim 0
(padding other dims to the largest rank's) and keeps the autograd graph: the
backward of ``torch.distributed.nn.functional.all_gather`` sums every rank's
gradient for the local slice. If each rank computes the same loss on the
gathered batch, that sum is ``world_size`` x the true gradient, which DDP's
averaging cancels, so training equals one process on the combined batch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "init_distributed",
    "destroy_distributed",
    "current_context",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "barrier",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` / ``world_size`` (1 when not distributed), ``local_rank``, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _default_device(local_rank: int, device: str = "auto") -> torch.device:
    if device != "auto":
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by torchrun's environment (no-op for a single process).

    Args:
        backend: ``"auto"`` (``nccl`` when the device is CUDA, else ``gloo``), ``"nccl"`` or ``"gloo"``.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` if CUDA is available, else CPU) or a device string.

    Returns:
        the :class:`DistributedContext` of this process. Without ``WORLD_SIZE``
        (or with ``WORLD_SIZE=1``) nothing is initialised.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _default_device(local_rank, device)
    if world_size <= 1 and not dist.is_initialized():
        return DistributedContext(0, 1, 0, chosen)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        import datetime

        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current_context(device)


def current_context(device: str = "auto") -> DistributedContext:
    """The context of an already initialised group (or of a single process)."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, _default_device(local_rank, device))
    return DistributedContext(0, 1, 0, _default_device(0, device))


def destroy_distributed() -> None:
    """Leave the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when distributed; nothing otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _padded_for_gather(tensor: torch.Tensor) -> tuple[torch.Tensor, List[int]]:
    """Pad ``tensor`` so that every rank holds one shape; return it and every rank's dim-0 size."""
    world_size = dist.get_world_size()
    shape = torch.tensor(list(tensor.shape), dtype=torch.int64, device=tensor.device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    largest = torch.stack(shapes).max(dim=0).values.tolist()
    padding: List[int] = []
    for current, target in zip(reversed(tensor.shape), reversed(largest)):
        padding += [0, int(target) - int(current)]
    if any(padding):
        tensor = torch.nn.functional.pad(tensor, padding)
    return tensor, [int(s[0]) for s in shapes]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (rank order), differentiably.

    Other dimensions may differ between ranks (e.g. caption length ``L``);
    they are zero-padded to the largest. Returns ``tensor`` itself when not
    distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    padded, sizes = _padded_for_gather(tensor)
    with warnings.catch_warnings():
        # deprecated in favour of a private API (_functional_collectives); still the public autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_with_grad` without autograd (ids, lengths, teacher scores)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    padded, sizes = _padded_for_gather(tensor.detach())
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def broadcast_object(value: object, source: int = 0) -> object:
    """Rank ``source``'s ``value`` on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def all_gather_object(value: object) -> List[object]:
    """Every rank's ``value``, in rank order (``[value]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def reduce_mean(values: Sequence[float]) -> List[float]:
    """Mean of ``values`` over ranks (logging of per-rank losses); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).cpu().tolist()
