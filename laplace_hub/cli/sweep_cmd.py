"""``laplace-hub sweep``: learning vs forgetting over methods, λ and seeds on your own model and data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from laplace_hub.cli._common import add_command, parse_list, print_json
from laplace_hub.errors import LaplaceHubError

# library parameter (as its errors name it) → this command's flag
FLAGS = {
    "source": "--source",
    "target": "--target",
    "target_train": "--target-train",
    "target_val": "--target-val",
    "target_test": "--target-test",
    "artifacts": "--artifact",
    "methods": "--methods",
    "targets": "--targets",
    "curvature": "--curvature",
}


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "sweep",
        "Fine-tune with each method, λ and seed; measure learning and forgetting; choose λ on validation data.",
        "  laplace-hub sweep smollm2 --source pydoc=stdlib:pydoc --target arithmetic --out sweep/\n"
        "  laplace-hub sweep ./my-model --source wiki=wiki.txt --target-train t.jsonl --target-val v.jsonl \\\n"
        "      --target-test s.jsonl --methods lora,l2,diag,kron --strengths 1,10,100 --seeds 0,1,2 \\\n"
        "      --artifact kron=./pulled-artifact --priority learning --budget 0.02 --out sweep/ --json\n"
        "  laplace-hub sweep smollm2 --source pydoc=stdlib:pydoc --target arithmetic --out sweep/ --resume\n"
        "  laplace-hub sweep smollm2 --source pydoc=stdlib:pydoc --target arithmetic --methods lora,kron \\\n"
        "      --curvature own=self:32 --select budget --out sweep-self/   # data-free curvature, λ by bisection\n"
        'Target files are .jsonl of {"prompt": ..., "completion": ...}; the source file is split 3/4 for\n'
        "the curvature and 1/8 + 1/8 for validation and test of forgetting.",
    )
    p.add_argument("model", help="model folder, Hub id, or 'smollm2'")
    p.add_argument("--gguf-file")
    p.add_argument("--source", required=True, metavar="NAME=PATH", help="source text (as for compute)")
    p.add_argument("--target", choices=["arithmetic", "sorting"], help="a generated target task instead of files")
    p.add_argument(
        "--task-sizes", default="256,100,100", metavar="TRAIN,VAL,TEST", help="problems of the generated --target"
    )
    p.add_argument("--target-train", type=Path)
    p.add_argument("--target-val", type=Path)
    p.add_argument("--target-test", type=Path)
    p.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="STRUCTURE=DIR",
        help="use this artifact for diag, diag_lowrank, kron or kron_eig instead of computing it",
    )
    p.add_argument(
        "--methods",
        default="lora,l2,diag,diag_lowrank,kron,kron_eig,lora_diag,mtt,milora,flat_lora,migu",
        help="lora (none), l2, diag, diag_lowrank, kron, kron_eig (weight-space LaLoRA), kron_eig_sketch (kron_eig "
        "from one-pass sketches), the paper's forms on the LoRA weights at each seed's init: lora_diag (DIAG; "
        "lora_init before 0.2), lora_kron (B-K-FAC), lora_tridiag (B-TRI-K-FAC); "
        "mtt (Mask-the-Target, own KL-weight grid 0.1,1,10), milora, flat_lora (own ρ grid 0.01,0.05,0.1), "
        "migu (own t grid .25,.5,.75)",
    )
    p.add_argument(
        "--curvature",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="compute the artifacts from this data instead of the source's curvature split (repeatable; "
        "NAME=source is that split, self:N the model's own samples; each cut to the split's size)",
    )
    p.add_argument("--strengths", default="10,100,1000")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD=VALUES",
        help="the knob values of a method with its own grid instead of that grid, e.g. mtt=0.01,0.03 (repeatable)",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--eig-rank", type=int, default=32)
    p.add_argument("--curvature-batches", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--priority",
        choices=["retention", "learning"],
        default="retention",
        help="retention: least forgetting at matched target accuracy; learning: best target "
        "accuracy within --budget of source NLL rise",
    )
    p.add_argument("--tolerance", type=float, default=0.01, help="what 'matched' accuracy means (0.01 = 1 point)")
    p.add_argument("--budget", type=float, help="allowed source NLL rise for --priority learning")
    p.add_argument(
        "--select",
        choices=["grid", "budget"],
        default="grid",
        help="grid: choose among --strengths; budget: then bisect every method's knob (λ, Mask-the-Target's "
        "KL weight, Flat-LoRA's ρ, MIGU's t; in log scale) towards the most protective value whose "
        "validation target EM stays within --tolerance of plain LoRA's",
    )
    p.add_argument("--bisect-steps", type=int, default=3, help="bisection steps per method for --select budget")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in OUT/runs.csv (an interrupted sweep, or other methods) and run only the rest",
    )
    p.add_argument(
        "--no-probes",
        action="store_true",
        help="skip the forgetting probes (near/out-of-domain text, the base model's chat answers, skills)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    """Run the sweep and write runs.csv, summary.json and pareto.png."""
    from laplace_hub.data import DatasetSpec
    from laplace_hub.evaluation.experiment import SweepExperiment, run_experiment
    from laplace_hub.evaluation.report import table
    from laplace_hub.evaluation.sweep import OWN_GRIDS, SourceSizes, SweepConfig

    methods = parse_list(args.methods, str, "--methods")
    if "lora_init" in methods:
        print("note: --methods lora_init is now lora_diag (the name goes in 0.3)", file=sys.stderr)
    grids = {**OWN_GRIDS, **dict(_grid(item) for item in args.grid)}
    experiment = SweepExperiment(
        model=args.model,
        gguf_file=args.gguf_file,
        source=DatasetSpec.parse(args.source),
        out=args.out,
        sweep=SweepConfig(
            methods=methods,
            strengths=parse_list(args.strengths, float, "--strengths"),
            seeds=parse_list(args.seeds, int, "--seeds"),
            targets=args.targets,
            lora_rank=args.lora_rank,
            steps=args.steps,
            lr=args.lr,
            eig_rank=args.eig_rank,
            probes=not args.no_probes,
            grids=grids,
        ),
        sizes=SourceSizes(
            curvature_batches=args.curvature_batches, eval_batches=args.eval_batches, max_length=args.max_length
        ),
        target=args.target,
        target_train=args.target_train,
        target_val=args.target_val,
        target_test=args.target_test,
        artifacts=dict(_artifact(item) for item in args.artifact),
        resume=args.resume,
        priority=args.priority,
        tolerance=args.tolerance,
        budget=args.budget,
        curvature=tuple(DatasetSpec.parse(item) for item in args.curvature),
        bisect_steps=args.bisect_steps if args.select == "budget" else 0,
        task_sizes=_task_sizes(args.task_sizes),
    )
    outcome = run_experiment(experiment)
    if args.json:
        print_json(outcome.json())
    else:
        print(table(outcome.summary))
        for c in outcome.choices:
            print(f"{c.method}: {c.verdict}")
        print(f"files: {', '.join(map(str, experiment.files))}")
    return 0


def _task_sizes(text: str) -> tuple[int, int, int]:
    sizes = parse_list(text, int, "--task-sizes")
    if len(sizes) != 3 or min(sizes) < 1:
        raise LaplaceHubError(f"--task-sizes {text!r}: expected three positive counts TRAIN,VAL,TEST")
    return sizes[0], sizes[1], sizes[2]


def _grid(item: str) -> tuple[str, tuple[float, ...]]:
    """``--grid METHOD=V1,V2`` → ``(method, (v1, v2))``, for a method that sweeps its own knob."""
    from laplace_hub.evaluation.sweep import NO_KNOB, OWN_GRIDS

    method, _, values = item.partition("=")
    if method not in OWN_GRIDS or method in NO_KNOB or not values:
        knobs = ", ".join(m for m in OWN_GRIDS if m not in NO_KNOB)
        raise LaplaceHubError(f"--grid {item!r}: expected METHOD=VALUES for one of {knobs}")
    return method, parse_list(values, float, "--grid")


def _artifact(item: str) -> tuple[str, Path]:
    """``--artifact STRUCTURE=DIR`` → ``(structure, folder)``."""
    structure, _, folder = item.partition("=")
    if not structure or not folder:
        raise LaplaceHubError(f"--artifact {item!r}: expected STRUCTURE=DIR")
    return structure, Path(folder)
