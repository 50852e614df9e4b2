"""What a producer computes, how it accumulates and what it writes, each concern its own options.

Functions take the part they need (the accumulator never sees how the artifact is written);
:class:`ComputeOptions` joins the parts so that callers still set everything with one flat call,
``ComputeOptions(structure="diag", dtype="float64")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from laplace_hub.artifact.store import tensor_dtype
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import EstimatorKind, KfacApprox, Normalization

# The structures a producer computes (kron_eig is kron with ``eig_rank``): a subset of the manifest's.
ComputedStructure = Literal["diag", "diag_lowrank", "kron", "kron_tridiag"]
COMPUTED_STRUCTURES: tuple[str, ...] = get_args(ComputedStructure)


@dataclass(frozen=True)
class CurvatureOptions:
    """What to compute (SPEC.md §4, §6). ``structure`` ``kron_tridiag`` needs ``lora``.

    ``diag_lowrank`` keeps the top ``lowrank_rank`` eigen-directions of the per-example Fisher,
    found by a Nyström sketch of ``lowrank_rank + sketch_oversample`` random directions.
    ``eig_sketch`` computes ``kron_eig`` (``eig_rank`` set) in one pass from sketches of the
    covariances along ``eig_rank + sketch_oversample`` directions, in ``O(d·k)`` memory instead
    of the dense ``d × d`` factors; exact once that width reaches ``d``.
    ``seed`` draws the MC labels, the sketches' directions and the LoRA init.
    """

    structure: ComputedStructure = "kron"
    estimator: EstimatorKind = "empirical"
    mc_samples: int = 1
    normalization: Normalization = "per_sequence"
    kfac_approx: KfacApprox = "expand"
    eig_rank: int | None = None
    eig_sketch: bool = False
    lowrank_rank: int = 8
    sketch_oversample: int = 8
    parameterization: Literal["weight", "lora"] = "weight"
    per_dataset: bool = False
    seed: int = 0

    @property
    def diagonal(self) -> bool:
        """Whether the structure is built from per-parameter diagonals (``diag``, ``diag_lowrank``)."""
        return self.structure in ("diag", "diag_lowrank")

    @property
    def draws(self) -> int:
        """Label draws per batch: ``mc_samples`` for the MC estimator, else the data's own labels once."""
        return self.mc_samples if self.estimator == "mc" else 1

    @property
    def sketch_size(self) -> int:
        """Random directions the ``diag_lowrank`` sketch is taken along (0: no sketch)."""
        return self.lowrank_rank + self.sketch_oversample if self.structure == "diag_lowrank" else 0

    @property
    def cov_sketch_size(self) -> int:
        """Random directions each Kronecker covariance is sketched along (0: summed in full)."""
        return (self.eig_rank or 0) + self.sketch_oversample if self.eig_sketch else 0

    def check(self) -> None:
        """Refuse combinations the spec or the estimators do not define.

        Raises:
            LaplaceHubError: Located at the parameter to change; others named as `name`.

        """
        if self.structure == "kron_tridiag" and self.parameterization != "lora":
            raise LaplaceHubError("kron_tridiag needs `parameterization` lora", location="structure")
        if self.estimator == "batch_empirical" and self.structure != "diag":
            raise LaplaceHubError(
                "batch_empirical (the paper's) is defined for `structure` diag only", location="estimator"
            )
        if self.structure == "diag_lowrank" and self.lowrank_rank < 1:
            raise LaplaceHubError(
                f"diag_lowrank needs `lowrank_rank` ≥ 1, got {self.lowrank_rank}", location="structure"
            )
        if self.eig_rank is not None and self.eig_rank < 1:
            raise LaplaceHubError(f"eigen rank must be ≥ 1, got {self.eig_rank}", location="eig_rank")
        if self.eig_sketch and self.eig_rank is None:
            raise LaplaceHubError("a sketched K-FAC needs `eig_rank` (kron_eig)", location="eig_sketch")
        if self.sketch_oversample < 0:
            raise LaplaceHubError(f"must not be negative, got {self.sketch_oversample}", location="sketch_oversample")
        if self.kfac_approx == "reduce" and self.normalization == "per_token":
            raise LaplaceHubError(
                "reduce aggregates over a sequence; `normalization` per_token needs expand", location="kfac_approx"
            )
        if self.eig_rank is not None and (self.structure != "kron" or self.parameterization != "weight"):
            raise LaplaceHubError(
                "eigen-truncation applies to weight-space kron only (`structure` kron, `parameterization` weight)",
                location="eig_rank",
            )


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA adapter the curvature is for when ``parameterization`` is ``lora`` (as PEFT's config)."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False


@dataclass(frozen=True)
class WriteOptions:
    """What the artifact stores: the factors' dtype, packed symmetric factors, the curvature's licence."""

    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    packed: bool = False
    license: str | None = None


@dataclass(frozen=True)
class ComputeOptions(CurvatureOptions, LoraOptions, WriteOptions):
    """Every option of :func:`~laplace_hub.producers.compute_artifact`, set in one flat call.

    ``accumulate_dtype`` is how the sums are run; the parts say what is computed and written.

    >>> ComputeOptions(structure="diag", dtype="float64").compute_dtype
    torch.float64
    """

    accumulate_dtype: torch.dtype = torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The accumulation dtype, never below the stored one (a float64 artifact is computed in float64)."""
        return torch.promote_types(self.accumulate_dtype, tensor_dtype(self.dtype))
