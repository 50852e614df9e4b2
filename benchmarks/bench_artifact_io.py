"""Lazy reading of a ~1 GB artifact, and an exact multi-shard round trip.

    python benchmarks/bench_artifact_io.py [--gib 1.0] [--repeats 5]

Prints the time to open the artifact (manifest, index, headers) and load one module's block,
the write time, and whether every tensor read back bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from laplace_hub import Artifact
from laplace_hub.artifact import ArtifactBuilder, minimal_fields
from laplace_hub.curvature import DenseFactor, KronBlock


def build(gib: float) -> Artifact:
    side = 2048
    per_module = 2 * side * side * 4
    modules = max(1, int(gib * 2**30 / per_module))
    builder = ArtifactBuilder()
    for i in range(modules):
        x = torch.randn(side, side)
        builder.add(f"model.layers.{i}.mlp.up_proj", (side, side), KronBlock(DenseFactor(x), DenseFactor(x.T)))
    return builder.build(**minimal_fields())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    art = build(args.gib)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        saved = art.save(Path(tmp) / "a", max_shard_bytes=256 * 2**20)
        write_s = time.perf_counter() - start
        files = sorted(p.name for p in (Path(tmp) / "a").iterdir())
        size = sum(p.stat().st_size for p in (Path(tmp) / "a").iterdir())
        opens, blocks = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            lazy = Artifact.open(Path(tmp) / "a")
            opens.append(time.perf_counter() - start)
            start = time.perf_counter()
            block = lazy.block("model.layers.3.mlp.up_proj")
            float(block.input.dense().sum() + block.output.dense().sum())  # read every byte
            blocks.append(time.perf_counter() - start)
        exact = all(torch.equal(a, b) for a, b in zip(art.tensors().values(), saved.tensors().values(), strict=True))
    shards = sum(f.endswith(".safetensors") for f in files)
    print(f"artifact: {size / 2**30:.2f} GiB in {len(files)} files ({shards} shards)")
    print(f"write (atomic, sha256 of every file): {write_s:.2f} s")
    print(f"open (manifest + index + headers), median of {args.repeats}: {statistics.median(opens) * 1e3:.1f} ms")
    print(
        f"load one module's block and read its 2 x 16 MiB, median of {args.repeats}: "
        f"{statistics.median(blocks) * 1e3:.1f} ms"
    )
    print(f"round trip bit-identical: {exact}")


if __name__ == "__main__":
    main()
