"""Compact artifacts: bytes, and the penalty's relative error against the float32 artifact.

    python -m laplace_hub.cli compute smollm2 --data pydoc=stdlib:pydoc --num-batches 2 --out /tmp/a32
    python benchmarks/bench_compress.py /tmp/a32 [--ranks 64,32,16] [--deltas 5] [--lora-rank 8]

For each variant (a lower dtype; ``--rank k`` for each k, i.e. kron → kron_eig or a lower
diag_lowrank / kron_eig rank; both), compresses the artifact, writes it (verified), and evaluates
``Σ_modules vec(Δ)ᵀ P vec(Δ)`` for random LoRA updates ``Δ = B A`` (``A``, ``B`` Gaussian, rank
``--lora-rank``) on the target modules, in float64 for every artifact so that only storage differs.
Prints bytes, the ratio to the source and to the covered weights at bf16, the median (and max)
relative error over the deltas against the source, and for a lower dtype at rank k also against the
float32 artifact at rank k (the dtype's own share). A variant that compress refuses prints why.
``--also DIR`` adds artifacts computed otherwise (e.g. ``compute --rank 32 --sketch``), measured
against the source with the same deltas.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from laplace_hub.artifact import Artifact, compress
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import DType


def penalty(
    artifact: Artifact, modules: list[str], deltas: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
) -> list[float]:
    """``Σ_modules vec(B A)ᵀ P vec(B A)`` for each delta, evaluated in float64."""
    totals = [0.0] * len(deltas)
    for name in modules:
        block = artifact.block(name, dtype=torch.float64)
        for i, delta in enumerate(deltas):
            b, a = delta[name]
            totals[i] += float(block.quad_lowrank(b, a))  # type: ignore[attr-defined]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="a float32 weight-space artifact")
    parser.add_argument("--ranks", default="64,32,16", help="comma-separated ranks to compress to")
    parser.add_argument("--deltas", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--also", type=Path, action="append", default=[], help="another artifact to compare; repeat")
    args = parser.parse_args()
    source = Artifact.open(args.artifact)
    suffixes = tuple(f".{t}" for t in args.targets.split(","))
    modules = [n for n in source.manifest.modules if n.endswith(suffixes)]
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(args.deltas):
        delta = {}
        for name in modules:
            d_out, d_in = source.manifest.modules[name].shape
            b = torch.randn(d_out, args.lora_rank, generator=gen, dtype=torch.float64)
            a = torch.randn(args.lora_rank, d_in, generator=gen, dtype=torch.float64)
            delta[name] = (b, a)
        deltas.append(delta)
    structures = sorted({b.structure for m in source.manifest.modules.values() for b in m.blocks})
    covered = sum(2 * m.shape[0] * m.shape[1] for m in source.manifest.modules.values())
    print(
        f"source: {args.artifact} ({source.manifest.dtype} {', '.join(structures)}, {len(source.manifest.modules)} "
        f"modules), {source.nbytes() / 2**20:.1f} MiB = {source.nbytes() / covered:.2f}x the covered weights at bf16 "
        f"({covered / 2**20:.1f} MiB); penalty on {len(modules)} {args.targets} modules, {args.deltas} random "
        f"LoRA r={args.lora_rank} deltas"
    )
    print(
        f"{'variant':<18} {'MiB':>7} {'/source':>8} {'/covered':>9} {'seconds':>8} "
        f"{'err median':>11} {'max':>9} {'dtype share':>12}"
    )
    ranks: list[int | None] = [None, *(int(r) for r in args.ranks.split(","))]
    variants: list[tuple[int | None, DType | None]] = []
    for rank in ranks:
        variants += (
            [(rank, None), (rank, "bfloat16"), (rank, "float16")] if rank else [(None, "bfloat16"), (None, "float16")]
        )
    full: dict[int | None, list[float]] = {None: penalty(source, modules, deltas)}
    for other in args.also:
        errors = _errors(penalty(Artifact.open(other), modules, deltas), full[None])
        size = Artifact.open(other).nbytes()
        print(
            f"{other.name:<18} {size / 2**20:>7.1f} {size / source.nbytes():>8.3f} {size / covered:>9.3f} "
            f"{'':>8} {statistics.median(errors):>11.2e} {max(errors):>9.2e}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for rank, dtype in variants:
            label = " ".join(filter(None, (f"rank {rank}" if rank else None, dtype)))
            start = time.perf_counter()
            try:
                small = compress(source, rank=rank, dtype=dtype).save(Path(tmp) / label.replace(" ", "_"), verify=True)
            except LaplaceHubError as e:
                print(f"{label:<18} refused: {e.message[:110]}")
                continue
            seconds = time.perf_counter() - start
            values = penalty(small, modules, deltas)
            if dtype is None:
                full[rank] = values
            errors = _errors(values, full[None])
            share = ""
            if dtype is not None and rank in full:
                own = _errors(values, full[rank])
                share = f"{statistics.median(own):.2e}"
            print(
                f"{label:<18} {small.nbytes() / 2**20:>7.1f} {small.nbytes() / source.nbytes():>8.3f} "
                f"{small.nbytes() / covered:>9.3f} {seconds:>8.1f} {statistics.median(errors):>11.2e} "
                f"{max(errors):>9.2e} {share:>12}"
            )


def _errors(values: list[float], reference: list[float]) -> list[float]:
    return [abs(p - r) / r for p, r in zip(values, reference, strict=True)]


if __name__ == "__main__":
    main()
