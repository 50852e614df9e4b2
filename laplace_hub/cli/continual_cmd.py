"""``laplace-hub continual``: two tasks in sequence on SmolLM2, with and without the merged posterior."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from laplace_hub.cli._common import add_command, parse_list, print_json


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "continual",
        "Learn two generated tasks in sequence on SmolLM2; compare forgetting of the source and of task 1.",
        "  laplace-hub continual --out out/continual\n"
        "  laplace-hub continual --task1 sorting --task2 arithmetic --decay 0.8 --seeds 0 --json\n"
        "  laplace-hub continual --steps 2 --seeds 0 --test-problems 8 --curvature-batches 1 --eval-batches 1\n"
        "Task 2 is learnt with plain LoRA, with the source prior alone, and with the posterior that\n"
        "`laplace-hub merge` makes of the prior and task 1's curvature. The run time grows with --steps,\n"
        "the number of seeds, --test-problems (scored for each of five models), --curvature-batches\n"
        "(two K-FAC computations) and --eval-batches; the last example is a smoke test.",
    )
    p.add_argument("--out", type=Path, default=Path("out/continual"), help="runs.csv, continual.json, posterior/")
    p.add_argument("--task1", choices=["arithmetic", "sorting"], default="arithmetic")
    p.add_argument("--task2", choices=["arithmetic", "sorting"], default="sorting")
    p.add_argument("--strength", type=float, default=10.0, help="λ of every penalty")
    p.add_argument("--decay", type=float, default=1.0, help="γ in (0, 1] applied to the prior when merging")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the task-2 runs")
    p.add_argument("--steps", type=int, default=40, help="LoRA steps per task")
    p.add_argument("--test-problems", type=int, default=100, help="test problems per task, scored for every model")
    p.add_argument(
        "--curvature-batches",
        type=int,
        default=8,
        help="batches of 4 for each K-FAC: the prior on source text and task 1's at the new weights",
    )
    p.add_argument("--eval-batches", type=int, default=4, help="held-out source batches of 4 that measure forgetting")
    p.add_argument("--max-length", type=int, default=64, help="tokens per source sequence")
    p.add_argument("--no-probes", action="store_true", help="skip the forgetting probes beyond the source text")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run both tasks and print the table."""
    from laplace_hub.errors import LaplaceHubError
    from laplace_hub.evaluation.continual import ContinualConfig, format_table, run_continual
    from laplace_hub.evaluation.sweep import SourceSizes, SweepConfig

    if args.task1 == args.task2:
        raise LaplaceHubError("--task1 and --task2 must differ")
    if not 0 < args.decay <= 1:
        raise LaplaceHubError(f"--decay must lie in (0, 1], got {args.decay}")
    for flag in ("test_problems", "curvature_batches", "eval_batches"):
        if getattr(args, flag) < 1:
            raise LaplaceHubError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_length < 2:
        raise LaplaceHubError(f"--max-length must be at least 2, got {args.max_length}")
    cfg = ContinualConfig(
        out=args.out,
        task1=args.task1,
        task2=args.task2,
        strength=args.strength,
        decay=args.decay,
        seeds=parse_list(args.seeds, int, "--seeds"),
        source=SourceSizes(
            curvature_batches=args.curvature_batches, eval_batches=args.eval_batches, max_length=args.max_length
        ),
        n_test=args.test_problems,
        recipe=dataclasses.replace(SweepConfig(), steps=args.steps, probes=not args.no_probes),
    )
    result = run_continual(cfg)
    if args.json:
        print_json(result)
    else:
        print(format_table(result["summary"]))
    return 0
