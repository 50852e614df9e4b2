"""Cost of one training step per method, relative to plain LoRA, on the real SmolLM2-135M.

    python benchmarks/bench_methods.py [--steps 5] [--repeats 3]

The sweep's recipe (LoRA r=8 on q_proj and v_proj of all 30 layers, AdamW, batches of 8
arithmetic problems). Each method trains ``--steps`` steps from a fresh adapter; methods take
turns over ``--repeats`` rounds so that drifts of a noisy machine hit them alike. Printed: the
median seconds per step and its ratio to plain LoRA's, all measured in this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from laplace_hub.evaluation.sweep import (
    METHODS,
    OWN_GRIDS,
    SourceSizes,
    SweepConfig,
    SweepData,
    curvature_artifacts,
    finetune,
    pydoc_splits,
)
from laplace_hub.evaluation.tasks import task_splits
from laplace_hub.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model("smollm2")
    cfg = dataclasses.replace(SweepConfig(), steps=args.steps)
    train = task_splits("arithmetic", 64, 0, 0)["train"]
    curvature, _, _ = pydoc_splits(tokenizer, SourceSizes())  # the sweep's curvature split
    data = SweepData(train, [], [], curvature, [], [])
    artifacts = curvature_artifacts(base, data, cfg)
    grids = {m: OWN_GRIDS.get(m, (10.0,)) for m in METHODS}
    strength = {m: grid[len(grid) // 2] for m, grid in grids.items()}  # the middle of each grid
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    finetune(base, tokenizer, train, "lora", 0.0, artifacts, cfg, 0)  # warm-up
    for _ in range(args.repeats):
        for method in METHODS:
            _, total = finetune(base, tokenizer, train, method, strength[method], artifacts, cfg, 0)
            seconds[method].append(total / args.steps)
    lora = statistics.median(seconds["lora"])
    print(
        f"SmolLM2-135M, LoRA r={cfg.lora_rank} on {cfg.targets}, batches of {cfg.batch_size} problems, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} × {args.steps} steps"
    )
    print(f"{'method':<14} {'knob':>6} {'s / step':>9} {'÷ LoRA':>8}")
    for method in METHODS:
        median = statistics.median(seconds[method])
        print(f"{method:<14} {strength[method]:>6g} {median:>9.3f} {median / lora:>8.2f}")


if __name__ == "__main__":
    main()
