"""``laplace-hub demo``: the whole story on the real SmolLM2-135M, offline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from laplace_hub.cli._common import add_command, print_json


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "demo",
        "Publisher computes and publishes K-FAC curvature; fine-tuner pulls it and fine-tunes with and without it.",
        "  laplace-hub demo\n  laplace-hub demo --steps 10 --out /tmp/demo --json",
    )
    p.add_argument("--out", default="out/demo", help="folder for the local hub, demo.json")
    p.add_argument("--steps", type=int, default=40, help="LoRA training steps per run")
    p.add_argument("--strength", type=float, default=1e3, help="λ of the regularised run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its table."""
    from laplace_hub.evaluation import DemoConfig, format_table, run_demo

    result = run_demo(DemoConfig(out=Path(args.out), steps=args.steps, strengths=(0.0, args.strength)))
    if args.json:
        print_json(result)
    else:
        print(format_table(result["rows"]))
        print(f"report: {Path(args.out) / 'demo.json'}")
    return 0
