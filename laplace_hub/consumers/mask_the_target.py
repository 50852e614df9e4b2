"""Mask-the-Target (arXiv 2605.29498): a data-free output-space regulariser against forgetting.

At every labelled position, drop the ground-truth token from the base model's and the adapted
model's next-token distributions, renormalise both, and penalise ``KL(base ‖ adapted)`` over the
remaining vocabulary. The base model's preferences among the *other* tokens are kept without
opposing the cross-entropy that teaches the target token: the penalty's gradient with respect to
the target token's logit is exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hub.errors import ModelMismatchError
from laplace_hub.numerics import at_least_float32


def masked_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probabilities renormalised over the vocabulary without each position's target token."""
    masked = at_least_float32(logits).scatter(-1, targets.clamp_min(0).unsqueeze(-1), float("-inf"))
    return torch.log_softmax(masked, -1)


def mask_the_target_kl(base_logits: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over labelled positions of ``KL(p̃_base ‖ p̃_adapted)`` (next-token alignment as in causal LMs)."""
    targets = labels[:, 1:].to(logits.device)
    valid = targets != -100  # only labelled positions: the vocabulary-wide work is per position
    base = masked_log_probs(base_logits[:, :-1][valid], targets[valid])
    adapted = masked_log_probs(logits[:, :-1][valid], targets[valid])
    # the target's entry is -inf in both: exp(-inf)·(...) must count as 0, not NaN
    kl = (base.exp() * (base - adapted)).nan_to_num(0.0).sum(-1)
    return kl.sum() / valid.sum().clamp_min(1)


class MaskTheTarget(nn.Module):
    """``strength · KL`` over the non-target vocabulary; needs the batch and the adapted logits.

    The base model's logits come from a forward pass of the same PEFT model with its adapter
    disabled (no gradient): one extra forward per step, measured in ``benchmarks/bench_penalty.py``.
    """

    def __init__(self, model: nn.Module, strength: float) -> None:
        super().__init__()
        if not hasattr(model, "disable_adapter"):
            raise ModelMismatchError("Mask-the-Target needs a PEFT model (its base logits come with the adapter off)")
        self._model = [model]  # not a submodule: the regulariser owns no parameters
        self.strength = strength

    def forward(self, batch: Mapping[str, Any], logits: Tensor) -> Tensor:
        """The penalty for one batch, given the adapted model's logits on it."""
        model: Any = self._model[0]
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return self.strength * mask_the_target_kl(base_logits, logits, batch["labels"])
