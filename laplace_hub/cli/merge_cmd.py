"""``laplace-hub merge``: fold a new task's curvature into a prior (continual posteriors)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from laplace_hub.cli._common import add_command, print_json
from laplace_hub.progress import phase


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "merge",
        "Posterior for the next task: decay · PRIOR + NEW, anchored at NEW's (fine-tuned) weights.",
        "  # after fine-tuning on task 1 and merging the adapter into ./model-task1:\n"
        "  laplace-hub compute ./model-task1 --data task1=task1.jsonl --out ./curv-task1\n"
        "  laplace-hub merge ./prior ./curv-task1 --decay 0.9 --out ./posterior-task1\n"
        "  laplace-hub merge ./posterior-task1 ./curv-task2 --out ./posterior-task2 --json\n"
        "Both must be weight-parameterised, cover the same modules and share normalisation and\n"
        "estimator. Nothing is recomputed; the manifest's lineage records every part (pull Hub\n"
        "artifacts first with `laplace-hub pull`).",
    )
    p.add_argument("prior", type=Path, help="the prior artifact folder (computed or already merged)")
    p.add_argument("new", type=Path, help="curvature computed at the fine-tuned weights on the last task")
    p.add_argument("--decay", type=float, default=1.0, help="γ in (0, 1]: the prior's precision is multiplied by it")
    p.add_argument("--out", type=Path, required=True, help="the posterior artifact folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")
    p.set_defaults(run=run, flags={"decay": "--decay"})


def run(args: argparse.Namespace) -> int:
    """Open (and verify) both, merge, write atomically, report the lineage."""
    from laplace_hub.artifact import Artifact, merge

    Artifact.open(args.prior), Artifact.open(args.new)  # cheap: a wrong path is one error line, before any phase
    with phase(f"verifying {args.prior} and {args.new}"):
        prior = Artifact.open(args.prior, verify_checksums=True)
        new = Artifact.open(args.new, verify_checksums=True)
    merged = merge(prior, new, decay=args.decay, sources=(str(args.prior), str(args.new)))
    with phase(f"writing {args.out}"):
        saved = merged.save(args.out, overwrite=args.overwrite)
    lineage = [entry.model_dump(mode="json") for entry in saved.manifest.lineage or []]
    if args.json:
        print_json(
            {"out": str(args.out), "base_model": saved.manifest.base_model.model_dump(mode="json"), "lineage": lineage}
        )
    else:
        for entry in lineage:
            origin = entry["source"] or entry["base_model"]["repo_id"]
            print(f"  γ={entry['decay']:<8g} {', '.join(entry['datasets']):<24} from {origin}")
        print(f"{args.out}: posterior of {len(lineage)} part(s), anchored at {saved.manifest.base_model.repo_id}")
    return 0
