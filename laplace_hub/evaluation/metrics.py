"""Learning and forgetting: exact match on the target task, NLL and accuracy on held-out source text.

Each metric is kept per example (:class:`Scores`) as well as pooled, so that confidence intervals
can resample the examples (:mod:`~laplace_hub.evaluation.stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from laplace_hub.data import Batch, pad_batch
from laplace_hub.evaluation.tasks import Example

EXAMPLES = "_examples"
"""Suffix of a metric's per-example column (``test_target_em_examples``): :class:`Scores`."""


@dataclass(frozen=True)
class Scores:
    """A metric that pools examples: ``Σ values / Σ weights`` (tokens for a per-token NLL, 1 for exact match)."""

    values: tuple[float, ...]
    weights: tuple[float, ...]

    @property
    def mean(self) -> float:
        """The pooled metric."""
        return sum(self.values) / sum(self.weights)

    def encode(self) -> str:
        """As one CSV cell: ``value/weight`` per example, space-separated (:meth:`decode` reads it back)."""
        return " ".join(f"{v:.17g}/{w:.17g}" for v, w in zip(self.values, self.weights, strict=True))

    @classmethod
    def decode(cls, text: str) -> Scores:
        """Scores from :meth:`encode`'s text.

        Raises:
            ValueError: Not ``value/weight`` pairs of numbers with positive weights.

        """
        pairs = [item.split("/") for item in text.split()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError(f"per-example scores are value/weight pairs, got {text[:40]!r}")
        values, weights = tuple(float(v) for v, _ in pairs), tuple(float(w) for _, w in pairs)
        if not all(w > 0 for w in weights):
            raise ValueError("per-example weights must be positive")
        return cls(values, weights)


def example_batches(examples: Sequence[Example], tokenizer: Any, batch_size: int = 32) -> list[Batch]:
    """Prompt + completion + end of text; only the completion and end of text carry labels."""
    prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
    completions = [tokenizer(e.completion)["input_ids"] + [tokenizer.eos_token_id] for e in examples]
    sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
    return [
        pad_batch(sequences[i : i + batch_size], tokenizer.pad_token_id, [len(p) for p in prompts[i : i + batch_size]])
        for i in range(0, len(sequences), batch_size)
    ]


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def exact_match(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Share of completions (runs of labelled tokens) that greedy decoding would produce."""
    return completion_scores(model, batches).mean


@torch.no_grad()
def completion_scores(model: nn.Module, batches: Sequence[Batch]) -> Scores:
    """Per completion (run of labelled tokens): 1 if greedy decoding would produce it, else 0.

    Greedy decoding reproduces a completion exactly when every one of its tokens is the argmax
    given the true prefix, so one teacher-forced forward pass decides it. A sequence usually holds
    one completion; one that holds several (questions answered in turn) counts each.
    """
    correct: list[float] = []
    for batch in batches:
        predicted = _logits(model, batch)[:, :-1].argmax(-1).cpu()
        targets = batch["labels"][:, 1:]
        labelled = targets != -100
        starts = labelled & ~nn.functional.pad(labelled[:, :-1], (1, 0))  # a run begins where its row's did not
        run = starts.flatten().cumsum(0).view_as(labelled) - 1  # row-major, so no run crosses two rows
        wrong = torch.zeros(int(starts.sum()), dtype=torch.long)
        wrong.index_add_(0, run[labelled], (predicted != targets)[labelled].long())
        correct += (wrong == 0).double().tolist()
    return Scores(tuple(correct), (1.0,) * len(correct))


def source_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Per-token NLL and next-token accuracy on held-out source batches."""
    return {name: scores.mean for name, scores in source_scores(model, batches).items()}


@torch.no_grad()
def source_scores(model: nn.Module, batches: Sequence[Batch]) -> dict[str, Scores]:
    """Per sequence: NLL and correct next-token predictions, each weighted by its labelled tokens."""
    nll: list[float] = []
    correct: list[float] = []
    tokens: list[float] = []
    for batch in batches:
        logits = _logits(model, batch)[:, :-1].float().cpu()
        targets = batch["labels"][:, 1:]
        valid = targets != -100
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        keep = valid.any(-1)  # a sequence without labels counts nowhere
        nll += (-(log_probs.double() * valid).sum(-1))[keep].tolist()
        correct += ((logits.argmax(-1) == targets) & valid).sum(-1)[keep].double().tolist()
        tokens += valid.sum(-1)[keep].double().tolist()
    return {"source_nll": Scores(tuple(nll), tuple(tokens)), "source_accuracy": Scores(tuple(correct), tuple(tokens))}
