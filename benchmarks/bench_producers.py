"""Curvature cost per batch relative to a plain forward+backward, on the real SmolLM2-135M.

    python benchmarks/bench_producers.py [--repeats 5] [--batch-size 4] [--max-length 128]

Each structure runs in its own process (for an honest peak RSS); in every process the plain
forward+backward of the same batch is timed first, then the curvature pass, and the ratio of
medians is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

CASES = {
    "diag (per_sequence)": dict(structure="diag"),
    "diag (per_token)": dict(structure="diag", normalization="per_token"),
    "kron (expand)": dict(structure="kron"),
    "kron (reduce)": dict(structure="kron", kfac_approx="reduce"),
    "kron, mc x1": dict(structure="kron", estimator="mc"),
}


def measure(case: str, repeats: int, batch_size: int, max_length: int, queue: mp.Queue) -> None:
    from laplace_hub.data import make_batches, pydoc_texts
    from laplace_hub.models import load_model, select_targets
    from laplace_hub.producers import ComputeOptions
    from laplace_hub.producers.accumulate import CurvatureAccumulator
    from laplace_hub.producers.compute import _backward_batch

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    targets = select_targets(model, "q_proj,k_proj,v_proj,o_proj")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    batch = make_batches(pydoc_texts(), tokenizer, max_length=max_length, batch_size=batch_size, num_batches=1)[0]
    options = ComputeOptions(**CASES[case])

    def plain() -> None:
        model(**batch).loss.backward()

    acc = CurvatureAccumulator(
        dict(targets), "diag" if options.structure == "diag" else "kron", options.normalization, options.kfac_approx
    )
    gen = torch.Generator().manual_seed(0)

    def curvature() -> None:
        acc.attach()
        try:
            _backward_batch(model, batch, acc, options, gen)
        finally:
            acc.detach()

    times = {}
    for label, fn in (("plain", plain), ("curvature", curvature)):
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[label] = statistics.median(runs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((case, times["plain"], times["curvature"], peak, int(batch["attention_mask"].sum())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(
        f"SmolLM2-135M, targets q,k,v,o (120 modules), batch {args.batch_size} x <= {args.max_length} tokens, "
        f"median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    print(f"{'structure':<22} {'tokens':>6} {'fwd+bwd s':>10} {'curvature s':>12} {'ratio':>7} {'peak RSS MiB':>13}")
    for case in CASES:
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(case, args.repeats, args.batch_size, args.max_length, queue))
        proc.start()
        name, plain, curv, peak, tokens = queue.get()
        proc.join()
        print(f"{name:<22} {tokens:>6} {plain:>10.3f} {curv:>12.3f} {curv / plain:>7.2f} {peak:>13.0f}")


if __name__ == "__main__":
    main()
