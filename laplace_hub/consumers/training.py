"""The penalty inside the loss: for plain loops, transformers' Trainer and TRL's SFTTrainer.

The penalty is added to the loss (never to gradients in a callback), so gradient accumulation and
clipping behave as usual. Every adapter they save (checkpoints, ``save_model``, ``push_to_hub``)
records the prior it was trained under (:mod:`laplace_hub.consumers.provenance`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from laplace_hub.consumers.provenance import Provenance, write_provenance
from laplace_hub.consumers.regularizer import LaplaceRegularizer
from laplace_hub.errors import MissingExtraError


def regularized_loss(loss: Tensor, regularizer: LaplaceRegularizer | None) -> Tensor:
    """``loss + penalty`` for a plain PyTorch loop (``regularizer=None`` leaves it unchanged)."""
    return loss if regularizer is None else loss + regularizer().to(loss.dtype)


def save_adapter(model: Any, folder: str | Path, regularizer: LaplaceRegularizer, **kwargs: Any) -> Provenance:
    """``model.save_pretrained(folder, **kwargs)``, then the record of the prior beside the adapter.

    For plain loops; the Trainer mixins do the same on every save. See
    :func:`~laplace_hub.consumers.write_provenance`.

    Returns:
        The record written to ``laplace_provenance.json`` and the model card.

    """
    model.save_pretrained(str(folder), **kwargs)
    return write_provenance(folder, regularizer)


class LaplaceTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass: ``compute_loss`` adds the penalty and logs it.

    Pass ``regularizer=`` to the constructor; ``laplace_penalty`` and ``laplace_strength`` are
    logged alongside the loss. Every save (checkpoint, ``save_model``, ``push_to_hub``) writes the
    regularizer's provenance beside the adapter and into its model card.
    """

    def __init__(self, *args: Any, regularizer: LaplaceRegularizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        if regularizer is not None:
            self.add_callback(_save_with_checkpoints(regularizer))  # type: ignore[attr-defined]
        self._penalty_sum = 0.0
        self._penalty_count = 0

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)  # type: ignore[misc]
        if self.regularizer is None:
            return result
        penalty = self.regularizer()
        self._penalty_sum += float(penalty.detach())
        self._penalty_count += 1
        if return_outputs:
            loss, outputs = result
            return loss + penalty.to(loss.dtype), outputs
        return result + penalty.to(result.dtype)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if self.regularizer is not None and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            if folder:
                self.regularizer.load(str(folder))
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _save(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        # every save path of Trainer (checkpoints, save_model, FSDP / DeepSpeed) ends here, before any push
        super()._save(output_dir, *args, **kwargs)  # type: ignore[misc]
        if self.regularizer is not None and self.args.should_save:  # type: ignore[attr-defined]
            write_provenance(output_dir or self.args.output_dir, self.regularizer)  # type: ignore[attr-defined]

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # push_to_hub writes a fresh card (Trainer's or TRL's) after saving: put the record back in
        super().create_model_card(*args, **kwargs)  # type: ignore[misc]
        if self.regularizer is not None and self.args.should_save:  # type: ignore[attr-defined]
            write_provenance(self.args.output_dir, self.regularizer)  # type: ignore[attr-defined]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.regularizer is not None and self._penalty_count and "loss" in logs:
            logs["laplace_penalty"] = self._penalty_sum / self._penalty_count
            logs["laplace_strength"] = self.regularizer.strength
            self._penalty_sum, self._penalty_count = 0.0, 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


def _save_with_checkpoints(regularizer: LaplaceRegularizer) -> Any:
    """A callback that writes the regularizer's state into every checkpoint folder."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class SaveRegularizer(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                regularizer.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    return SaveRegularizer()


def laplace_trainer_class() -> type:
    """``transformers.Trainer`` with the penalty in its loss."""
    try:
        from transformers import Trainer
    except ImportError as e:
        raise MissingExtraError("transformers", "hf") from e
    return type("LaplaceTrainer", (LaplaceTrainerMixin, Trainer), {})


def laplace_sft_trainer_class() -> type:
    """TRL's ``SFTTrainer`` with the penalty in its loss."""
    try:
        from trl import SFTTrainer  # type: ignore[attr-defined]
    except ImportError as e:
        raise MissingExtraError("trl", "trl") from e
    return type("LaplaceSFTTrainer", (LaplaceTrainerMixin, SFTTrainer), {})
