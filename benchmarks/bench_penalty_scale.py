"""The penalty at a larger shape: all-linear LoRA, its memory and its share of a training step.

    python benchmarks/bench_penalty_scale.py [--shape smollm2-360m] [--rank 16] [--repeats 3]

A random-init model of a real shape (``bench_scale.SHAPES``), LoRA r=16 on every linear module
(PEFT's ``all-linear``), a training step = forward + backward + AdamW on 4 × 128 random tokens.
For ``diag``, ``kron`` and the sketched ``kron_eig`` (k = 32), computed on one batch, prints the
bytes the regularizer holds and its forward+backward time over the step's (medians, same process).
"""

from __future__ import annotations

import argparse

import torch
from bench_penalty import median_time, training_step
from bench_scale import build, random_batches

from laplace_hub.consumers import LaplaceRegularizer
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact

STRUCTURES = {
    "diag": ComputeOptions(structure="diag"),
    "kron": ComputeOptions(structure="kron"),
    "kron_eig (k=32, sketched)": ComputeOptions(structure="kron", eig_rank=32, eig_sketch=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-360m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    base = build(args.shape, torch.float32, "cpu")
    batch = random_batches(base.config.vocab_size, 4, 128, 1)[0]
    targets = select_targets(base, "all-linear")
    artifacts = {
        name: compute_artifact(base, {"s": [batch]}, targets, options, BaseModelInfo(repo_id=args.shape))
        for name, options in STRUCTURES.items()
    }
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, config)
    step, params = training_step(model, batch)
    step_s = median_time(step, args.repeats)
    print(
        f"{args.shape} (random init), LoRA r={args.rank} on all {len(targets)} linear modules, "
        f"{torch.get_num_threads()} threads; training step on {int(batch['attention_mask'].sum())} tokens: "
        f"{step_s:.2f} s (median of {args.repeats})"
    )
    print(f"{'penalty':<28} {'held MiB':>9} {'fwd+bwd ms':>11} {'/ step':>8}")
    for name, artifact in artifacts.items():
        reg = LaplaceRegularizer.from_artifact(artifact, model, strength=1.0)
        held = sum(t.numel() * t.element_size() for t in artifact.tensors().values())

        def penalty(reg: LaplaceRegularizer = reg) -> None:
            torch.autograd.grad(reg(), params, allow_unused=True)

        seconds = median_time(penalty, args.repeats)
        print(f"{name:<28} {held / 2**20:>9.1f} {seconds * 1e3:>11.1f} {seconds / step_s:>8.2%}")


if __name__ == "__main__":
    main()
