"""``laplace-hub demo``: the whole story on the real SmolLM2-135M, offline."""

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
        "demo",
        "Publisher computes and publishes K-FAC curvature; fine-tuner pulls it and sweeps λ against plain LoRA.",
        "  laplace-hub demo\n  laplace-hub demo --steps 10 --seeds 0 --out /tmp/demo --json",
    )
    p.add_argument("--out", default="out/demo", help="folder for the local hub, runs.csv, demo.json, pareto.png")
    p.add_argument("--steps", type=int, help="LoRA training steps per run (default 40)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    p.add_argument("--strengths", help="comma-separated λ grid (default 3,10)")
    p.add_argument("--no-probes", action="store_true", help="skip the forgetting probes beyond the source text")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its report."""
    from laplace_hub.evaluation import DemoConfig, format_report, run_demo

    cfg = DemoConfig(out=Path(args.out))
    changes: dict[str, Any] = {}
    if args.steps:
        changes["steps"] = args.steps
    if args.seeds:
        changes["seeds"] = parse_list(args.seeds, int, "--seeds")
    if args.strengths:
        changes["strengths"] = parse_list(args.strengths, float, "--strengths")
    if args.no_probes:
        changes["probes"] = False
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, **changes))
    result = run_demo(cfg)
    if args.json:
        print_json(result)
    else:
        print(format_report(result, cfg.out))
    return 0
