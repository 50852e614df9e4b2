"""Penalty cost relative to one LoRA training step, on the real SmolLM2-135M.

    python benchmarks/bench_penalty.py [--repeats 7] [--rank 16]

LoRA r=16 on q,k,v,o of all 30 layers (120 modules), one training step = forward + backward +
AdamW on a batch of pydoc text (4 × ≤113 tokens by default, as the design notes' reference step).
The penalty's cost does not depend on the batch; the step's grows with its tokens. For every
structure the penalty's forward+backward is timed in the same process; the ratio of medians is
printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from laplace_hub.consumers import LaplaceRegularizer
from laplace_hub.data import make_batches, pydoc_texts
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import load_model, select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact

TARGETS = "q_proj,k_proj,v_proj,o_proj"


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
    """A LoRA model's training step (forward, backward, AdamW) with ``B`` moved off zero, as during
    training, and its trainable parameters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()

    return step, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=113)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, tokenizer = load_model("smollm2")
    texts = pydoc_texts()
    source = make_batches(texts, tokenizer, max_length=64, batch_size=4, num_batches=2, seed=1)
    batch = make_batches(
        texts, tokenizer, max_length=args.max_length, batch_size=args.batch_size, num_batches=1, seed=2
    )[0]
    targets = select_targets(base, TARGETS)
    artifacts = {
        "diag": compute_artifact(
            base, {"s": source}, targets, ComputeOptions(structure="diag"), BaseModelInfo(repo_id="b")
        ),
        "kron": compute_artifact(
            base, {"s": source}, targets, ComputeOptions(structure="kron"), BaseModelInfo(repo_id="b")
        ),
    }
    artifacts["kron_eig (k=64)"] = compute_artifact(
        base, {"s": source}, targets, ComputeOptions(structure="kron", eig_rank=64), BaseModelInfo(repo_id="b")
    )
    artifacts["diag_lowrank (k=16)"] = compute_artifact(
        base,
        {"s": source},
        targets,
        ComputeOptions(structure="diag_lowrank", lowrank_rank=16),
        BaseModelInfo(repo_id="b"),
    )
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS.split(","), lora_dropout=0.0),
    )
    step, params = training_step(model, batch)
    regularizers = {
        "L2 (identity)": LaplaceRegularizer.identity(model, strength=1.0),
        **{f"{k}, weight": LaplaceRegularizer.from_artifact(a, model, strength=1.0) for k, a in artifacts.items()},
        "diag, lora_init": LaplaceRegularizer.from_artifact(artifacts["diag"], model, strength=1.0, mode="lora_init"),
        "kron, lora_init": LaplaceRegularizer.from_artifact(artifacts["kron"], model, strength=1.0, mode="lora_init"),
        "kron tridiag, lora_init": LaplaceRegularizer.from_artifact(
            artifacts["kron"], model, strength=1.0, mode="lora_init", cross=True
        ),
    }
    step_s = median_time(step, args.repeats)
    tokens = int(batch["attention_mask"].sum())
    print(
        f"SmolLM2-135M, LoRA r={args.rank} on q,k,v,o (120 modules), {torch.get_num_threads()} threads, "
        f"training step on {tokens} tokens: {step_s:.3f} s (median of {args.repeats})"
    )
    print(f"{'penalty':<26} {'fwd+bwd ms':>11} {'/ step':>8}")
    from laplace_hub.consumers import MaskTheTarget

    mask_the_target = MaskTheTarget(model, strength=1.0)
    logits = model(**batch).logits.detach().requires_grad_()

    def mtt() -> None:
        # what it adds to a step: the base forward and the KL's forward+backward down to the logits
        # (the backward through the model is the task loss's, shared)
        torch.autograd.grad(mask_the_target(batch, logits), logits)

    seconds = median_time(mtt, args.repeats)
    print(f"{'mask-the-target':<26} {seconds * 1e3:>11.2f} {seconds / step_s:>8.2%}  (one no-grad base forward)")
    for name, reg in regularizers.items():

        def penalty(reg: LaplaceRegularizer = reg) -> None:
            torch.autograd.grad(reg(), params, allow_unused=True)

        seconds = median_time(penalty, args.repeats)
        print(f"{name:<26} {seconds * 1e3:>11.2f} {seconds / step_s:>8.2%}")


if __name__ == "__main__":
    main()
