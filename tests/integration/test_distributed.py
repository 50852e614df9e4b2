"""Two real processes (torch.distributed, gloo) give the same artifact as one process, with whole
models on each rank and with models sharded over the ranks by FSDP2 (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from laplace_hub.artifact import Artifact
from laplace_hub.data import pad_batch
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.producers.plan import PassPlan
from tests.conftest import tiny_llama, tiny_model_folder

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

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


# FSDP2: each rank holds half of every weight and sees its own batches (3 and 2 of 5: the rank one
# short runs an unlabelled one so that both gather the layers as often). Two passes, so the target
# weights' requires_grad changes between passes under FSDP2.
TWO_PASSES = PassPlan(
    groups=(
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"),
        ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"),
    ),
    group_bytes=(0, 0),
)
FSDP_OPTIONS = ComputeOptions(structure="kron", accumulate_dtype=torch.float64, dtype="float64")
no_fsdp2 = pytest.mark.skipif(fully_shard is None, reason=f"torch {torch.__version__} has no FSDP2 (fully_shard)")


def spawn(worker: Callable[..., None], args: tuple[Any, ...], timeout: float) -> None:
    """``mp.spawn`` on two processes, killed and failed after ``timeout`` s (a collective that never matches)."""
    context = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the processes did not finish within {timeout} s")


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        artifact = compute_artifact(
            model,
            {"src": batches()},
            select_targets(model, "q_proj,v_proj,down_proj"),
            FSDP_OPTIONS,
            BaseModelInfo(repo_id="tiny"),
            plan=TWO_PASSES,
        )
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.to_local().shape == (4, 8), "each rank still holds only its shard"
        assert all(p.grad is None for p in model.parameters()), "no gradient was kept (nor reduce-scattered)"
        assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"
        if rank == 0:
            artifact.save(out)
    finally:
        dist.destroy_process_group()


@no_fsdp2
def test_fsdp2_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    spawn(_fsdp_worker, (2, str(tmp_path / "init"), str(out)), timeout=300)  # ~20 s on 2 busy cores
    two = Artifact.open(out)
    model = tiny_llama()
    targets = select_targets(model, "q_proj,v_proj,down_proj")
    one = compute_artifact(model, {"src": batches()}, targets, FSDP_OPTIONS, BaseModelInfo(repo_id="tiny"))
    assert two.manifest.base_model.fingerprint == one.manifest.base_model.fingerprint  # the whole weights
    assert two.manifest.datasets == one.manifest.datasets
    assert list(two.manifest.modules) == list(one.manifest.modules)
    for name in one.manifest.modules:
        torch.testing.assert_close(
            two.block(name, dtype=torch.float64).dense(), one.block(name, dtype=torch.float64).dense()
        )


def _tiny_llama_folder(folder: Path) -> Path:
    return tiny_model_folder(folder, (5, 7, 3, 6, 4, 8), text="data.txt", seed=5)


@no_fsdp2
def test_cli_fsdp_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    folder = _tiny_llama_folder(tmp_path / "tiny")
    common = ["compute", str(folder), "--data", f"src={folder / 'data.txt'}", "--targets", "all-linear"]
    common += ["--batch-size", "2", "--num-batches", "3", "--float64", "--dtype", "float64", "--json"]
    # --standalone: a free rendezvous port, so two torchrun tests on parallel pytest workers never collide
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "laplace_hub.cli",
    ]
    runs = {
        "one": [sys.executable, "-m", "laplace_hub.cli", *common, "--out", str(tmp_path / "one")],
        "two": [*launch, *common, "--fsdp", "--max-memory", "4K", "--out", str(tmp_path / "two")],
    }
    summaries = {}
    for name, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)  # ~30 s each
        assert result.returncode == 0, (name, result.stderr[-3000:])
        summaries[name] = json.loads(result.stdout)
    assert summaries["one"]["passes"] == 1 and summaries["two"]["passes"] > 1
    assert not list(tmp_path.glob(".two.spill-*"))  # each rank's spilled passes are gone once written
    one, two = Artifact.open(tmp_path / "one"), Artifact.open(tmp_path / "two")
    assert two.manifest.base_model.fingerprint == one.manifest.base_model.fingerprint
    assert two.manifest.datasets == one.manifest.datasets
    for name in one.manifest.modules:
        torch.testing.assert_close(
            two.block(name, dtype=torch.float64).dense(), one.block(name, dtype=torch.float64).dense()
        )
