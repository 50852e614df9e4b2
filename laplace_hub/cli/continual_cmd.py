"""``laplace-hub continual``: two tasks in sequence on SmolLM2, with and without the merged posterior."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from laplace_hub.cli._common import add_command, print_json


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "continual",
        "Learn two generated tasks in sequence on SmolLM2; compare forgetting of the source and of task 1.",
        "  laplace-hub continual --out out/continual\n"
        "  laplace-hub continual --task1 sorting --task2 arithmetic --decay 0.8 --seeds 0 --json\n"
        "Task 2 is learnt with plain LoRA, with the source prior alone, and with the posterior that\n"
        "`laplace-hub merge` makes of the prior and task 1's curvature.",
    )
    p.add_argument("--out", type=Path, default=Path("out/continual"), help="runs.csv, continual.json, posterior/")
    p.add_argument("--task1", choices=["arithmetic", "sorting"], default="arithmetic")
    p.add_argument("--task2", choices=["arithmetic", "sorting"], default="sorting")
    p.add_argument("--strength", type=float, default=10.0, help="λ of every penalty")
    p.add_argument("--decay", type=float, default=1.0, help="γ in (0, 1] applied to the prior when merging")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the task-2 runs")
    p.add_argument("--steps", type=int, default=40, help="LoRA steps per task")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run both tasks and print the table."""
    from laplace_hub.cli.sweep_cmd import parse_list
    from laplace_hub.errors import LaplaceHubError
    from laplace_hub.evaluation.continual import ContinualConfig, format_table, run_continual
    from laplace_hub.evaluation.sweep import SweepConfig

    if args.task1 == args.task2:
        raise LaplaceHubError("--task1 and --task2 must differ")
    if not 0 < args.decay <= 1:
        raise LaplaceHubError(f"--decay must lie in (0, 1], got {args.decay}")
    cfg = ContinualConfig(
        out=args.out,
        task1=args.task1,
        task2=args.task2,
        strength=args.strength,
        decay=args.decay,
        seeds=parse_list(args.seeds, int, "--seeds"),
        recipe=dataclasses.replace(SweepConfig(), steps=args.steps),
    )
    result = run_continual(cfg)
    if args.json:
        print_json(result)
    else:
        print(format_table(result["summary"]))
    return 0
