"""Splitting batches across ``torch.distributed`` ranks and summing what they accumulated."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from laplace_hub.producers.accumulate import ModuleSums

C = TypeVar("C")


def init_from_env() -> None:
    """Join the process group ``torchrun`` (or ``accelerate launch``) describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> tuple[int, int]:
    """Rank of this process and the world size (0, 1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sums(sums: Mapping[str, ModuleSums], counts: Mapping[str, C]) -> Mapping[str, C]:
    """Sum the modules' tensors (in place) and integer counts over ranks; a no-op in a single process.

    Every rank must hold the same sums, so every rank must see at least one batch of every
    dataset (the producer checks this before it starts).
    """
    if rank_and_world()[1] == 1:
        return counts
    for name in sorted(sums):
        for tensor in sums[name].tensors():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    fields = ("sequences", "tokens", "batches")
    flat = torch.tensor([[getattr(c, f) for f in fields] for c in counts.values()], dtype=torch.int64)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced: dict[str, Any] = {}
    for row, (name, c) in zip(flat.tolist(), counts.items(), strict=True):
        reduced[name] = type(c)(*row)
    return reduced
