"""``laplace-hub compress``: a smaller valid artifact from an existing one (kron_eig, lower ranks, lower dtype)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, get_args

from laplace_hub.cli._common import add_command, add_max_bytes, human_bytes, print_json
from laplace_hub.manifest import DType
from laplace_hub.progress import phase


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "compress",
        "Make an artifact smaller: eigen-truncated Kronecker factors, lower ranks, a lower dtype.",
        "  laplace-hub compress ./artifact --dtype bfloat16 --out ./artifact-bf16\n"
        "  laplace-hub compress ./artifact --rank 32 --dtype bfloat16 --out ./artifact-r32 --json\n"
        "  laplace-hub compress ./artifact-r32 --rank 16 --out ./artifact-r16 --overwrite\n"
        "--rank k: kron → kron_eig (top-k eigenpairs of each factor + the mean of the rest; k below\n"
        "every factor's side); kron_eig and diag_lowrank above rank k are truncated to k (dropped\n"
        "eigenvalues go into the tail, dropped directions into the diagonal). LoRA-space Kronecker\n"
        "blocks stay dense. --dtype only lowers precision (float32 → bfloat16 or float16). The\n"
        "result is validated before it appears at --out; its manifest's software records the source.",
    )
    p.add_argument("path", type=Path, help="the artifact folder to compress")
    p.add_argument("--rank", type=int, help="the largest rank to keep (kron → kron_eig at this rank)")
    p.add_argument("--dtype", choices=get_args(DType), help="the stored dtype of the result (lower only)")
    p.add_argument("--out", type=Path, required=True, help="the artifact folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print bytes, ratio and provenance as JSON")
    add_max_bytes(p)
    p.set_defaults(
        run=run,
        flags={"rank": "--rank", "dtype": "--dtype", "overwrite": "--overwrite", "max_bytes": "--max-bytes"},
    )


def run(args: argparse.Namespace) -> int:
    """Open (and verify) the source, compress, write validated and atomically, report the sizes."""
    from laplace_hub.artifact import Artifact, compress
    from laplace_hub.errors import ArtifactError

    if args.out.exists() and not args.overwrite:  # before minutes of work, not after
        raise ArtifactError("already exists; pass `overwrite` to replace it", location=str(args.out))
    source = Artifact.open(args.path, verify_checksums=True, max_bytes=args.max_bytes)
    small = compress(source, rank=args.rank, dtype=args.dtype, source=str(args.path))  # a bar over the modules
    with phase(f"writing and validating {args.out}"):
        saved = small.save(args.out, overwrite=args.overwrite, verify=True)
    before, after = source.nbytes(), saved.nbytes()
    structures = sorted({b.structure for m in saved.manifest.modules.values() for b in m.blocks})
    provenance = [v for k, v in saved.manifest.software.items() if k.startswith("laplace-hub.compress")][-1]
    if args.json:
        print_json(
            {
                "out": str(args.out),
                "bytes_before": before,
                "bytes_after": after,
                "ratio": after / before,
                "dtype": saved.manifest.dtype,
                "structures": structures,
                "provenance": provenance,
            }
        )
    else:
        print(
            f"{args.out}: {human_bytes(before)} → {human_bytes(after)} ({after / before:.3f}× the source), "
            f"{saved.manifest.dtype}, {', '.join(structures)}, valid"
        )
    return 0
