"""Two real processes (torch.distributed, gloo) give the same artifact as one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from laplace_hub.artifact import Artifact
from laplace_hub.data import pad_batch
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from tests.conftest import tiny_llama

pytestmark = pytest.mark.distributed


def batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    lengths = [(5, 3), (6, 2), (4, 4), (3, 6), (2, 5)]  # 5 batches: ranks get 3 and 2
    return [pad_batch([torch.randint(1, 23, (n,), generator=gen).tolist() for n in pair], 0) for pair in lengths]


def compute(structure: str) -> Artifact:
    model = tiny_llama()
    options = ComputeOptions(structure=structure, accumulate_dtype=torch.float64, dtype="float64")  # type: ignore[arg-type]
    return compute_artifact(
        model, {"src": batches()}, select_targets(model, "q_proj,v_proj"), options, BaseModelInfo(repo_id="tiny")
    )


def _worker(rank: int, world: int, init_file: str, out: str, structure: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        artifact = compute(structure)
        if rank == 0:
            artifact.save(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("structure", ["kron", "diag", "diag_lowrank"])
def test_two_gloo_processes_equal_one(tmp_path: Path, structure: str) -> None:
    out = tmp_path / "artifact"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), structure), nprocs=2, join=True)
    two = Artifact.open(out)
    one = compute(structure)
    assert two.manifest.datasets == one.manifest.datasets
    for name in one.manifest.modules:
        torch.testing.assert_close(
            two.block(name, dtype=torch.float64).dense(), one.block(name, dtype=torch.float64).dense()
        )
