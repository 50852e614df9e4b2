"""Consumers: a LaLoRA regularizer from an artifact, and its place in training loops."""

from laplace_hub.consumers.mask_the_target import MaskTheTarget
from laplace_hub.consumers.provenance import (
    PROVENANCE_FILE,
    ArtifactSource,
    Provenance,
    read_provenance,
    write_provenance,
)
from laplace_hub.consumers.regularizer import LaplaceRegularizer, adapted_modules, apply_lora_init
from laplace_hub.consumers.training import (
    LaplaceTrainerMixin,
    laplace_sft_trainer_class,
    laplace_trainer_class,
    regularized_loss,
    save_adapter,
)

__all__ = [
    "PROVENANCE_FILE",
    "ArtifactSource",
    "LaplaceRegularizer",
    "LaplaceTrainerMixin",
    "MaskTheTarget",
    "Provenance",
    "adapted_modules",
    "apply_lora_init",
    "laplace_sft_trainer_class",
    "laplace_trainer_class",
    "read_provenance",
    "regularized_loss",
    "save_adapter",
    "write_provenance",
]
