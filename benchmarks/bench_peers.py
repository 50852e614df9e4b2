"""The same K-FAC factors from laplace-hub, curvlinops and Kronfluence: checked equal, then timed.

    python benchmarks/bench_peers.py [--targets q_proj,k_proj,v_proj,o_proj] [--batches 8]
        [--batch-size 4] [--max-length 64] [--repeats 3] [--json docs/results/peers-smollm2.json]

On the shipped SmolLM2-135M and pydoc batches (what ``compute`` sees), in float32 with the
empirical Fisher and ``expand`` K-FAC: laplace-hub's producer (``compute_artifact``), curvlinops'
``KFACLinearOperator`` (``compute --backend curvlinops``) and Kronfluence's
``fit_covariance_matrices`` (its factors turned into an artifact by the Kronfluence bridge). Every
Kronecker factor of the three must agree (relative Frobenius difference ≤ 1e-4) before any time
counts. Then the three run interleaved, ``--repeats`` times; each repeat gives each tool's time
over the fastest peer's, and the medians are printed. Kronfluence's time includes writing its
factor files (what its command does); the others' stay in memory. Peak memory is not measured here.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from laplace_hub.artifact import Artifact
from laplace_hub.bridges import curvlinops as curvlinops_bridge
from laplace_hub.bridges import kronfluence as kronfluence_bridge
from laplace_hub.data import make_batches, pydoc_texts
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import load_model, select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact


def _kronfluence_rows(batches: list[dict[str, torch.Tensor]]) -> torch.utils.data.Dataset:  # type: ignore[type-arg]
    """Our padded batches as Kronfluence's rows: inputs ids[:-1], labels ids[1:], the labelled positions kept."""
    rows = []
    for batch in batches:
        labels = batch["labels"][:, 1:]
        for i in range(len(labels)):
            rows.append(
                {"input_ids": batch["input_ids"][i, :-1], "labels": labels[i], "mask": (labels[i] != -100).long()}
            )

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return rows[i]

    return Rows()


def _kronfluence(model: torch.nn.Module, names: list[str], out: Path) -> Any:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task

    class LanguageModeling(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: dict, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["mask"]).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")

        def compute_measurement(self, batch: dict, model: torch.nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self) -> list[str]:
            return names

        def get_attention_mask(self, batch: dict) -> torch.Tensor:
            return batch["mask"]

    task = LanguageModeling()
    return Analyzer("peers", prepare_model(model, task), task, output_dir=str(out), disable_model_save=True, cpu=True)


def _factors(artifact: Artifact, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    block = artifact.block(name, dtype=torch.float64)
    return block.input.dense(), block.output.dense()  # type: ignore[attr-defined]


def _agree(reference: Artifact, other: Artifact, names: list[str]) -> float:
    worst = 0.0
    for name in names:
        for ours, theirs in zip(_factors(reference, name), _factors(other, name), strict=True):
            worst = max(worst, float((ours - theirs).norm() / ours.norm()))
    return worst


def main() -> None:
    """Check, time, print (and write ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from kronfluence.arguments import FactorArguments

    model, tokenizer = load_model("smollm2")
    model = model.float().eval()
    batches = make_batches(
        pydoc_texts(), tokenizer, max_length=args.max_length, batch_size=args.batch_size, num_batches=args.batches
    )
    targets = select_targets(model, args.targets)
    names = list(targets)
    info = BaseModelInfo(repo_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    options = ComputeOptions(structure="kron")
    scratch = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    analyzer = _kronfluence(copy.deepcopy(model), names, scratch)
    rows = _kronfluence_rows(batches)
    fit_args = FactorArguments(strategy="kfac", use_empirical_fisher=True)

    def ours() -> Artifact:
        return compute_artifact(model, {"source": batches}, targets, options, info)

    def curvlinops() -> Artifact:
        return curvlinops_bridge.compute_kfac(model, {"source": batches}, targets, options, info)

    def kronfluence() -> Artifact:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analyzer.fit_covariance_matrices(
                "f", rows, per_device_batch_size=args.batch_size, factor_args=fit_args, overwrite_output_dir=True
            )
        return kronfluence_bridge.to_artifact(
            scratch / "peers" / "factors_f", model, base_model=info, batch_size=args.batch_size
        )

    tools = {"laplace-hub": ours, "curvlinops": curvlinops, "kronfluence": kronfluence}
    made = {name: run() for name, run in tools.items()}  # also warms each one up
    differences = {name: _agree(made["laplace-hub"], made[name], names) for name in ("curvlinops", "kronfluence")}
    print("max relative Frobenius difference of every factor to laplace-hub's:", differences)
    if max(differences.values()) > 1e-4:
        raise SystemExit("the factors differ: no time is reported")
    seconds: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(args.repeats):
        for name, run in tools.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    ratios = {
        name: statistics.median(
            times[i] / min(seconds[peer][i] for peer in tools if peer != name) for i in range(args.repeats)
        )
        for name, times in seconds.items()
    }
    result = {
        "model": "SmolLM2-135M (shipped GGUF, float32)",
        "targets": args.targets,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens": int(sum((b["labels"][:, 1:] != -100).sum() for b in batches)),
        "threads": torch.get_num_threads(),
        "max_relative_difference": differences,
        "seconds": seconds,
        "median_seconds": {name: statistics.median(times) for name, times in seconds.items()},
        "ratio_to_fastest_peer": ratios,
    }
    for name in tools:
        print(
            f"{name:<12} median {result['median_seconds'][name]:.2f} s   ratio to the fastest peer {ratios[name]:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
