"""Pooling K-FAC sums into the spec's factors, and the artifact they make (SPEC.md §6).

The sums come from curvlinops operators (:mod:`laplace_hub.bridges.curvlinops`, the one module
that imports curvlinops; this one only reads their 3.0.x fields) or from Kronfluence's factor
files (:mod:`laplace_hub.bridges.kronfluence`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hub.artifact import Artifact, ArtifactBuilder, software_versions
from laplace_hub.curvature import DenseFactor, Factor, KronBlock
from laplace_hub.errors import LaplaceHubError
from laplace_hub.fingerprint import fingerprint_modules
from laplace_hub.linear import linear_shape
from laplace_hub.manifest import BaseModelInfo, DatasetInfo, DType, Estimator, Normalization, WeightParameterization

PROVENANCE_KEY = "laplace-hub.bridges.curvlinops"
EKFAC_REFUSED = (
    "EKFAC is not exported: its corrected eigenvalues form a full d_out × d_in diagonal in the Kronecker "
    "eigenbasis, which no structure of spec 1.2 holds (kron_eig keeps a Kronecker product of each factor's "
    "eigenvalues), and curvlinops drops the K-FAC factors once it has their eigenbasis; build a "
    "KFACLinearOperator with the same arguments instead (docs/bridges.md)"
)


@dataclass
class Counts:
    """Sequences and tokens that carried a label, and batches."""

    sequences: int = 0
    tokens: int = 0
    batches: int = 0


@dataclass
class Pool:
    """One dataset's K-FAC sums, pooled over the operators that saw its parts.

    ``inputs`` hold ``Σ x xᵀ`` over positions (``expand``) or ``Σ x̄ x̄ᵀ`` over sequences
    (``reduce``), ``outputs`` ``Σ g gᵀ`` averaged over MC draws: the spec's factors times the counts.
    """

    kfac_approx: str = ""
    fisher_type: str = ""
    mc_samples: int = 1
    seed: int | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)  # our name → module, in the operator's order
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)

    def add(self, op: Any, names: Mapping[int, str], curvlinops: Any) -> None:
        """Add one operator's factors, taken back to sums by its own counts."""
        settings = _settings(op, curvlinops)
        if self.fisher_type and settings != (self.kfac_approx, self.fisher_type, self.mc_samples, self.seed):
            raise LaplaceHubError(
                "operators of one artifact must share kfac_approx, fisher_type, mc_samples and seed",
                location="operators",
            )
        self.kfac_approx, self.fisher_type, self.mc_samples, self.seed = settings
        covered = _covered(op, names)
        if self.modules and list(covered) != list(self.modules):
            raise LaplaceHubError("operators of one artifact must cover the same modules", location="operators")
        counts, lengths = _count(op)
        if not (op._input_covariances or op._gradient_covariances):  # after the data's checks
            op.compute_kronecker_factors()
        if self.kfac_approx == "expand" and len(lengths) > 1:
            raise LaplaceHubError(
                f"curvlinops divides Σx by each batch's own sequence length, and this operator's have lengths "
                f"{sorted(lengths)}: with expand, give one operator per length (a list; they are pooled exactly)",
                location="operators",
            )
        reduction = op._loss_func.reduction
        if reduction == "mean" and lengths != {op._num_per_example_loss_terms}:
            raise LaplaceHubError(
                f"with reduction='mean' curvlinops scales Σg by num_per_example_loss_terms="
                f"{op._num_per_example_loss_terms}, but sequences have lengths {sorted(lengths)}; use reduction='sum'",
                location="operators",
            )
        x_sum = counts.tokens if self.kfac_approx == "expand" else counts.sequences
        g_sum = 1 if reduction == "sum" else op._N_data * op._num_per_example_loss_terms
        for name, (theirs, module) in covered.items():
            self.modules[name] = module
            _add_to(self.inputs, name, _host(op._input_covariances[theirs]) * x_sum)
            _add_to(self.outputs, name, _host(op._gradient_covariances[theirs]) * g_sum)
        self.counts.sequences += counts.sequences
        self.counts.tokens += counts.tokens
        self.counts.batches += counts.batches


def _value(setting: Any) -> str:
    return str(getattr(setting, "value", setting))  # curvlinops' str enums, or plain strings


def _settings(op: Any, curvlinops: Any) -> tuple[str, str, int, int | None]:
    """``(kfac_approx, fisher_type, mc_samples, seed)`` of an operator the spec can hold; refuses others."""
    if isinstance(op, curvlinops.EKFACLinearOperator):
        raise LaplaceHubError(EKFAC_REFUSED, location="operators")
    if not isinstance(op, curvlinops.KFACLinearOperator):
        raise LaplaceHubError(f"expected curvlinops' KFACLinearOperator, got {type(op).__name__}", location="operators")
    loss = op._loss_func
    if type(loss) is not nn.CrossEntropyLoss or loss.label_smoothing or loss.weight is not None:
        raise LaplaceHubError(
            f"the spec's loss is cross-entropy, the negative log-likelihood; got {loss!r}: build the operator with "
            "nn.CrossEntropyLoss (no class weights, no label smoothing)",
            location="operators",
        )
    fisher = _value(op._fisher_type)
    if fisher not in ("empirical", "mc"):
        raise LaplaceHubError(
            f"fisher_type {fisher!r} has no estimator in spec 1.2 (empirical, mc): type-2 is the exact Fisher that "
            "mc estimates, forward-only sets Σg = I; build the operator with fisher_type='mc' or 'empirical'",
            location="operators",
        )
    mc = int(op._mc_samples) if fisher == "mc" else 1
    return _value(op._kfac_approx), fisher, mc, int(op._seed) if fisher == "mc" else None


def _covered(op: Any, names: Mapping[int, str]) -> dict[str, tuple[str, nn.Module]]:
    """Our module name → (the operator's, the module), for each weight the operator covers."""
    covered: dict[str, tuple[str, nn.Module]] = {}
    for theirs, positions in op._mapping.items():
        module = op._model_func.get_submodule(theirs)
        if not isinstance(module, nn.Linear):
            raise LaplaceHubError(f"the spec covers nn.Linear weights, not {type(module).__name__}", location=theirs)
        if "bias" in positions:
            raise LaplaceHubError(
                "the operator covers the bias; the spec's blocks cover weights only: build it over the weights",
                location=theirs,
            )
        name = names.get(id(module))
        if name is None:
            raise LaplaceHubError("the operator covers a module that is not one of `model`'s", location=theirs)
        covered[name] = (theirs, module)
    return covered


def _count(op: Any) -> tuple[Counts, set[int]]:
    """Sequences, tokens and batches of an operator's data, and the sequence lengths seen."""
    counts, lengths = Counts(), set()
    ignore = op._loss_func.ignore_index
    for x, y in op._data:
        ids = x.get("input_ids") if isinstance(x, Mapping) else x
        if isinstance(ids, Tensor) and tuple(ids.shape[: y.dim()]) != tuple(y.shape):
            raise LaplaceHubError(
                f"X {tuple(ids.shape)} and y {tuple(y.shape)} must share their leading [sequences, positions] "
                "dimensions: curvlinops counts every position the layers see (feed ids[:, :-1], labels ids[:, 1:])",
                location="operators",
            )
        if bool((y == ignore).any()):
            raise LaplaceHubError(
                f"labels equal to ignore_index ({ignore}) are counted as loss terms by curvlinops: "
                "feed unpadded, fully labelled sequences",
                location="operators",
            )
        counts.sequences += int(op._batch_size_fn(x))
        counts.tokens += y.numel()
        counts.batches += 1
        lengths.add(y[0].numel() if y.dim() else 1)
    if counts.sequences != op._N_data or counts.sequences == 0:
        raise LaplaceHubError(
            f"the operator's data hold {counts.sequences} sequences, its num_data says {op._N_data}: "
            "give data that can be iterated again (a list or a DataLoader)",
            location="operators",
        )
    return counts, lengths


def _host(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.promote_types(tensor.dtype, torch.float32))


def _add_to(sums: dict[str, Tensor], name: str, tensor: Tensor) -> None:
    sums[name] = sums[name] + tensor if name in sums else tensor


def build(
    pools: Mapping[str, Pool],
    base_model: BaseModelInfo | str,
    estimator: Estimator,
    normalization: Normalization,
    per_dataset: bool,
    sources: Mapping[str, str] | None,
    *,
    dtype: DType,
    packed: bool,
    eig_rank: int | None,
    license: str | None,
    provenance: tuple[str, str] | None = None,
) -> Artifact:
    """The artifact of the pools: their blocks, the dataset records, the fingerprint.

    ``provenance``: the software key and text that say where the sums came from (default: curvlinops').
    """
    first = next(iter(pools.values()))
    for pool in pools.values():
        same = (pool.kfac_approx, pool.fisher_type, pool.mc_samples) == (
            first.kfac_approx,
            first.fisher_type,
            first.mc_samples,
        )
        if not same or list(pool.modules) != list(first.modules):
            raise LaplaceHubError(
                "every dataset's operators must cover the same modules with the same settings", location="operators"
            )
    if first.kfac_approx == "reduce" and normalization == "per_token":
        raise LaplaceHubError(
            "reduce aggregates over a sequence; `normalization` per_token needs expand", location="normalization"
        )
    if eig_rank is not None and eig_rank < 1:
        raise LaplaceHubError(f"eigen rank must be ≥ 1, got {eig_rank}", location="eig_rank")
    shapes = {name: linear_shape(module, name) for name, module in first.modules.items()}
    builder = ArtifactBuilder(dtype=dtype, packed=packed)
    parts = pools.items() if per_dataset else [(None, _pooled(list(pools.values())))]
    for dataset, pool in parts:
        for name, block in _blocks(pool, normalization, eig_rank).items():
            builder.add(name, shapes[name], block, dataset)
    if isinstance(base_model, str):
        base_model = BaseModelInfo(repo_id=base_model)
    infos = [
        DatasetInfo(
            name=name,
            sequences=pool.counts.sequences,
            tokens=pool.counts.tokens,
            batches=pool.counts.batches,
            source=(sources or {}).get(name),
        )
        for name, pool in pools.items()
    ]
    return builder.build(
        base_model=base_model.model_copy(update={"fingerprint": fingerprint_modules(first.modules)}),
        parameterization=WeightParameterization(kind="weight"),
        estimator=estimator,
        loss="cross_entropy",
        normalization=normalization,
        kfac_approx=first.kfac_approx,
        datasets=infos,
        datasets_combined="separate" if per_dataset else "summed",
        license=license,
        software={
            **software_versions(),
            **dict([provenance or (PROVENANCE_KEY, f"KFACLinearOperator, fisher_type {first.fisher_type}")]),
        },
    )


def _pooled(pools: list[Pool]) -> Pool:
    """The pools of several datasets as one (their curvature summed, one normalisation over all)."""
    if len(pools) == 1:
        return pools[0]
    total = Pool(pools[0].kfac_approx, pools[0].fisher_type, pools[0].mc_samples, pools[0].seed, pools[0].modules)
    for pool in pools:
        for name in pool.modules:
            _add_to(total.inputs, name, pool.inputs[name])
            _add_to(total.outputs, name, pool.outputs[name])
        total.counts.sequences += pool.counts.sequences
        total.counts.tokens += pool.counts.tokens
        total.counts.batches += pool.counts.batches
    return total


def _blocks(pool: Pool, normalization: Normalization, eig_rank: int | None) -> dict[str, KronBlock]:
    """The sums normalised as SPEC.md §6 says; input factors equal to the last bit (q/k/v) are shared."""
    counts = pool.counts
    x_div = counts.tokens if pool.kfac_approx == "expand" else counts.sequences
    g_div = counts.sequences if normalization == "per_sequence" else counts.tokens
    shared: dict[tuple[Any, ...], list[tuple[Tensor, Factor]]] = {}
    blocks = {}
    for name in pool.modules:
        sx = pool.inputs[name] / x_div
        key = (tuple(sx.shape), float(sx.sum()), float(sx.diagonal().sum()))  # a cheap sieve before torch.equal
        factor = next((f for t, f in shared.get(key, []) if torch.equal(t, sx)), None)
        if factor is None:
            factor = _factor(sx, eig_rank)
            shared.setdefault(key, []).append((sx, factor))
        blocks[name] = KronBlock(factor, _factor(pool.outputs[name] / g_div, eig_rank))
    return blocks


def _factor(matrix: Tensor, rank: int | None) -> Factor:
    factor = DenseFactor(matrix)
    return factor.compress(rank) if rank else factor


__all__ = ["EKFAC_REFUSED", "PROVENANCE_KEY", "Counts", "Pool", "build"]
