"""Two tasks in sequence on a real model: does the merged posterior keep the source and task 1.

Task 0 is the pretrained model with its K-FAC prior on source text. Task 1 is learnt with LoRA
under that prior and merged into the weights; its own curvature, computed at the new weights on
its training data, is merged into the prior (``laplace-hub merge``). Task 2 is then learnt three
ways from the task-1 weights: plain LoRA, the old source prior alone, and the merged posterior.
With ``recipe.probes``, every model is also scored on the forgetting probes of
:mod:`~laplace_hub.evaluation.probes`, built once from the base model.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from laplace_hub.artifact import merge
from laplace_hub.data import Batch
from laplace_hub.evaluation.demo import say
from laplace_hub.evaluation.metrics import example_batches, source_metrics
from laplace_hub.evaluation.probes import PROBE_LABELS, PROBE_METRICS, Probes, build_probes, probe_metrics
from laplace_hub.evaluation.report import bar_panels, write_json, write_rows
from laplace_hub.evaluation.sweep import SourceSizes, SweepConfig, finetune, pydoc_splits
from laplace_hub.evaluation.tasks import task_splits
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import SMOLLM2_REPO_ID, load_model, select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact

METRICS = ("source_nll", "task1_em", "task1_nll", "task2_em", "task2_nll")
COLUMNS = {
    "source_nll": "source NLL",
    "task1_em": "task-1 EM",
    "task1_nll": "task-1 NLL",
    "task2_em": "task-2 EM",
    "task2_nll": "task-2 NLL",
}


@dataclass(frozen=True)
class ContinualConfig:
    """The two tasks, the penalty, the LoRA recipe (that of the sweep) and the sizes.

    The sizes set the run time as much as ``recipe.steps`` does: ``n_test`` problems per task are
    scored for each of the five models, ``source.curvature_batches`` batches enter each of the two
    K-FAC computations, and ``source.eval_batches`` held-out source batches measure forgetting.
    """

    out: Path = Path("out/continual")
    task1: str = "arithmetic"
    task2: str = "sorting"
    strength: float = 10.0
    decay: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    source: SourceSizes = field(default_factory=SourceSizes)
    n_train: int = 256
    n_test: int = 100
    recipe: SweepConfig = field(default_factory=SweepConfig)


@torch.no_grad()
def _answer_scores(model: Any, batches: Sequence[Batch]) -> tuple[float, float]:
    """Exact match and the NLL per answer token from one forward pass per batch.

    The same numbers as :func:`~laplace_hub.evaluation.metrics.exact_match` and the ``source_nll`` of
    :func:`~laplace_hub.evaluation.metrics.source_metrics` on these batches, for half the forward passes.
    """
    device = next(model.parameters()).device
    correct, total, nll, tokens = 0, 0, 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        logits = logits.logits[:, :-1].float().cpu()
        targets = batch["labels"][:, 1:]
        valid = targets != -100
        correct += int(((logits.argmax(-1) == targets) | ~valid).all(1).sum())
        total += len(targets)
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float((log_probs * valid).sum())
        tokens += int(valid.sum())
    return correct / total, nll / tokens


def _measure(
    model: Any, source: Sequence[Batch], tests: dict[str, list[Batch]], probes: Probes | None
) -> dict[str, float]:
    """Source NLL per token; per task, exact match and the NLL per token of the answers (finer than EM); probes."""
    scores = {"source_nll": source_metrics(model, source)["source_nll"]}
    for task, batches in tests.items():
        scores[f"{task}_em"], scores[f"{task}_nll"] = _answer_scores(model, batches)  # labels: the answers only
    return scores | (probe_metrics(model, probes) if probes is not None else {})


def run_continual(cfg: ContinualConfig) -> dict[str, Any]:
    """Rows per (variant, seed) after task 2, the reference rows, and a summary of means."""
    model, tokenizer = load_model("smollm2")
    curvature, _, source_test = pydoc_splits(tokenizer, cfg.source)
    task1 = task_splits(cfg.task1, cfg.n_train, 0, cfg.n_test, seed=1)
    task2 = task_splits(cfg.task2, cfg.n_train, 0, cfg.n_test, seed=2)
    tests = {"task1": example_batches(task1["test"], tokenizer), "task2": example_batches(task2["test"], tokenizer)}
    kron = ComputeOptions(structure="kron")
    probes = None
    if cfg.recipe.probes:
        say("[task 0] forgetting probes: near/out-of-domain text, the base model's chat answers, skills")
        probes = build_probes(model, tokenizer, cfg.recipe.probe_sizes)

    say(f"[task 0] K-FAC prior of SmolLM2 on pydoc ({len(curvature)} batches)")
    prior = compute_artifact(
        model,
        {"pydoc": curvature},
        select_targets(model, cfg.recipe.targets),
        kron,
        BaseModelInfo(repo_id=SMOLLM2_REPO_ID),
    )
    say(f"[task 1] LoRA on {cfg.task1} with the prior, λ={cfg.strength:g}; merged into the weights")
    adapted, _ = finetune(model, tokenizer, task1["train"], "kron", cfg.strength, {"kron": prior}, cfg.recipe, 0)
    after_1 = adapted.merge_and_unload()
    sizes = cfg.source
    task1_batches = example_batches(task1["train"], tokenizer, sizes.batch_size)[: sizes.curvature_batches]
    say(f"[task 1] K-FAC at the new weights on {len(task1_batches)} batches of task 1; merge with decay {cfg.decay:g}")
    new = compute_artifact(
        after_1,
        {cfg.task1: task1_batches},
        select_targets(after_1, cfg.recipe.targets),
        kron,
        BaseModelInfo(repo_id=f"{SMOLLM2_REPO_ID}+{cfg.task1}"),
    )
    posterior = merge(prior, new, decay=cfg.decay).save(cfg.out / "posterior", overwrite=True)
    rows = [
        {"variant": "base model", "seed": None, **_measure(model, source_test, tests, probes)},
        {"variant": "after task 1", "seed": None, **_measure(after_1, source_test, tests, probes)},
    ]
    variants = {
        "plain LoRA": ("lora", {}),
        "source prior only": ("kron", {"kron": prior}),  # computed at the base weights, used at task 1's
        "merged posterior": ("kron", {"kron": posterior}),
    }
    for variant, (method, artifacts) in variants.items():
        recipe = dataclasses.replace(cfg.recipe, check_fingerprint=variant != "source prior only")
        for seed in cfg.seeds:
            say(f"[task 2] {cfg.task2}: {variant}, seed {seed}")
            tuned, _ = finetune(after_1, tokenizer, task2["train"], method, cfg.strength, artifacts, recipe, seed)
            rows.append({"variant": variant, "seed": seed, **_measure(tuned, source_test, tests, probes)})
    write_rows(rows, cfg.out / "runs.csv")
    config = {
        "task1": cfg.task1,
        "task2": cfg.task2,
        "strength": cfg.strength,
        "decay": cfg.decay,
        "steps": cfg.recipe.steps,
        "n_test": cfg.n_test,
        "source": dataclasses.asdict(cfg.source),
        "probes": dataclasses.asdict(cfg.recipe.probe_sizes) if probes is not None else None,
    }
    summary = summarize(rows)
    result = {"config": config, "summary": summary}
    write_json(result, cfg.out / "continual.json")
    panels = {
        "source_nll": "source NLL (lower: less forgetting)",
        "task1_nll": f"task 1 ({cfg.task1}) answer NLL",
        "task2_em": f"task 2 ({cfg.task2}) exact match",
        **{m: PROBE_LABELS[m] for m in PROBE_METRICS if probes is not None},
    }
    bar_panels(summary, "variant", panels, cfg.out / "continual.png", "after task 2: what each prior kept")
    return result


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per variant, in the order the variants ran (probes if measured)."""
    out = []
    measured = [*METRICS, *(m for m in PROBE_METRICS if all(m in r for r in rows))]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        members = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "seeds": len(members)}
        for metric in measured:
            values = [m[metric] for m in members]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the summary (test means ± sd over seeds); the probes' in a second table."""
    lines = _markdown(summary, COLUMNS)
    probes = {m: PROBE_LABELS[m] for m in PROBE_METRICS if all(m in s for s in summary)}
    if probes:
        lines += ["", *_markdown(summary, probes)]
    return "\n".join(lines)


def _markdown(summary: Sequence[dict[str, Any]], columns: dict[str, str]) -> list[str]:
    lines = ["| model | seeds | " + " | ".join(columns.values()) + " |", "|---|---|" + "---|" * len(columns)]
    for s in summary:
        cells = [
            f"{s[m]:.3f} ± {s[m + '_std']:.3f}" if m.endswith("_em") else f"{s[m]:.4f} ± {s[m + '_std']:.4f}"
            for m in columns
        ]
        lines.append(f"| {s['variant']} | {s['seeds']} | " + " | ".join(cells) + " |")
    return lines
