"""Models spread over ranks or devices: where inputs go, and summing what the ranks accumulated.

The producer runs data-parallel over ``torch.distributed`` ranks whatever engine holds the weights:
each rank keeps a whole model (plain), a shard of it (FSDP2's ``fully_shard``), or a model that
accelerate spread over devices, CPU and disk (``device_map``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from laplace_hub.errors import LaplaceHubError
from laplace_hub.producers.accumulate import ModuleSums

C = TypeVar("C")
T = TypeVar("T")


def init_from_env() -> None:
    """Join the process group ``torchrun`` (or ``accelerate launch``) describes in the environment.

    With CUDA, NCCL reduces the device tensors and gloo the counts and budgets kept on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its inputs: the device of its first parameter that holds data.

    accelerate keeps offloaded parameters on the meta device and moves inputs to each module's
    execution device itself, so any real device will do; FSDP2's sharded parameters report the
    device of the local shard.
    """
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


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


def smallest_over_ranks(value: int | None) -> int | None:
    """The smallest ``value`` over ranks (``None``: unknown on every rank), so that all ranks plan alike.

    Every rank must run the same passes: the sums are all-reduced pass by pass, and FSDP2 gathers
    weights collectively in every forward.
    """
    if rank_and_world()[1] == 1:
        return value
    unknown = torch.iinfo(torch.int64).max
    held = torch.tensor([unknown if value is None else value], dtype=torch.int64)
    dist.all_reduce(held, op=dist.ReduceOp.MIN)
    return None if int(held) == unknown else int(held)


def load_sharded(load: Callable[[], tuple[nn.Module, T]]) -> tuple[nn.Module, T]:
    """Load a model with ``load`` on each rank in turn and shard it over all ranks with FSDP2.

    Each decoder layer (the classes transformers lists in ``model._no_split_modules``) becomes one
    ``fully_shard`` unit and the whole model the root, so each rank keeps 1/world of every weight on
    its device (CUDA if there is one) and gathers one layer at a time in the forward and backward.
    The ranks load one after another, so host memory holds one whole copy of the weights at a time.

    Args:
        load: Loads the whole model onto the CPU; returns it with anything else (a tokenizer).

    Returns:
        The sharded model and what ``load`` returned beside it.

    Raises:
        LaplaceHubError: not under ``torch.distributed``, no FSDP2 in this torch, or no decoder
            layer class known (located at ``fsdp``).

    """
    if not (dist.is_available() and dist.is_initialized()):
        raise LaplaceHubError("FSDP2 needs torch.distributed: launch with torchrun --nproc-per-node N", location="fsdp")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        message = f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard, torch ≥ 2.6)"
        raise LaplaceHubError(message, location="fsdp") from e
    rank, world = rank_and_world()
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))  # collectively, before the turns
    loaded: tuple[nn.Module, T] | None = None
    for turn in range(world):
        if turn == rank:
            model, extra = load()
            names = set(getattr(model, "_no_split_modules", None) or ())
            layers = [m for m in model.modules() if type(m).__name__ in names]
            if not layers:
                raise LaplaceHubError(
                    f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard",
                    location="fsdp",
                )
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            loaded = model, extra
        dist.barrier()
    assert loaded is not None
    return loaded
