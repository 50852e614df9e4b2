"""Learning and forgetting: exact match on the target task, NLL and accuracy on held-out source text."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from laplace_hub.data import Batch, pad_batch
from laplace_hub.evaluation.tasks import Problem


def problem_batch(problems: Sequence[Problem], tokenizer, pad_id: int) -> Batch:  # type: ignore[no-untyped-def]
    """Question + answer; only the answer (and end-of-text) carry labels."""
    prompts = [tokenizer(f"Q: {p.question}\nA:")["input_ids"] for p in problems]
    answers = [tokenizer(f" {p.answer}")["input_ids"] + [tokenizer.eos_token_id] for p in problems]
    return pad_batch([q + a for q, a in zip(prompts, answers, strict=True)], pad_id, [len(q) for q in prompts])


@torch.no_grad()
def exact_match(model: nn.Module, batch: Batch) -> float:
    """Share of problems whose whole answer greedy decoding would produce (one teacher-forced pass)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    correct = (logits.argmax(-1) == targets) | ~valid
    return float(correct.all(1).float().mean())


@torch.no_grad()
def source_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Per-token NLL and next-token accuracy on held-out source batches."""
    nll, correct, tokens = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        valid = targets != -100
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float((log_probs * valid).sum())
        correct += int(((logits.argmax(-1) == targets) & valid).sum())
        tokens += int(valid.sum())
    return {"source_nll": nll / tokens, "source_accuracy": correct / tokens}
