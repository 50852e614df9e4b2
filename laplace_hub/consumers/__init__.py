"""Consumers: a LaLoRA regularizer from an artifact, and its place in training loops."""

from laplace_hub.consumers.mask_the_target import MaskTheTarget
from laplace_hub.consumers.regularizer import LaplaceRegularizer, adapted_modules, apply_lora_init
from laplace_hub.consumers.training import (
    LaplaceTrainerMixin,
    laplace_sft_trainer_class,
    laplace_trainer_class,
    regularized_loss,
)

__all__ = [
    "LaplaceRegularizer",
    "LaplaceTrainerMixin",
    "MaskTheTarget",
    "adapted_modules",
    "apply_lora_init",
    "laplace_sft_trainer_class",
    "laplace_trainer_class",
    "regularized_loss",
]
