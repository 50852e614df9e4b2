"""Learning and forgetting: exact match on the target task, NLL and accuracy on held-out source text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from laplace_hub.data import Batch, pad_batch
from laplace_hub.evaluation.tasks import Example


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


@torch.no_grad()
def exact_match(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Share of completions (runs of labelled tokens) that greedy decoding would produce.

    Greedy decoding reproduces a completion exactly when every one of its tokens is the argmax
    given the true prefix, so one teacher-forced forward pass decides it. A sequence usually holds
    one completion; one that holds several (questions answered in turn) counts each.
    """
    correct, total = 0, 0
    for batch in batches:
        predicted = _logits(model, batch)[:, :-1].argmax(-1).cpu()
        targets = batch["labels"][:, 1:]
        labelled = targets != -100
        starts = labelled & ~nn.functional.pad(labelled[:, :-1], (1, 0))  # a run begins where its row's did not
        run = starts.flatten().cumsum(0).view_as(labelled) - 1  # row-major, so no run crosses two rows
        wrong = torch.zeros(int(starts.sum()), dtype=torch.long)
        wrong.index_add_(0, run[labelled], (predicted != targets)[labelled].long())
        correct += int((wrong == 0).sum())
        total += len(wrong)
    return correct / total


@torch.no_grad()
def source_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Per-token NLL and next-token accuracy on held-out source batches."""
    nll, correct, tokens = 0.0, 0, 0
    for batch in batches:
        logits = _logits(model, batch)[:, :-1].float().cpu()
        targets = batch["labels"][:, 1:]
        valid = targets != -100
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float((log_probs * valid).sum())
        correct += int(((logits.argmax(-1) == targets) & valid).sum())
        tokens += int(valid.sum())
    return {"source_nll": nll / tokens, "source_accuracy": correct / tokens}
