"""curvlinops → laplace-hub: curvlinops' K-FAC operators as weight-space ``kron`` artifacts.

:func:`to_artifact` turns a computed ``KFACLinearOperator`` (or several, over disjoint parts of the
data) into an artifact; :func:`compute_kfac` computes one for a causal LM through curvlinops
(``laplace-hub compute --backend curvlinops``).

Scale (SPEC.md §6, docs/bridges.md). curvlinops' ``Σx`` is the mean of ``x xᵀ`` over the positions
(``expand``) or of ``x̄ x̄ᵀ`` over the sequences (``reduce``), as ours. Its ``Σg`` is the sum of
``g gᵀ`` over the data (loss ``reduction="sum"``) or that sum over ``num_data ·
num_per_example_loss_terms`` (``"mean"``), averaged over MC draws; this bridge takes it back to
the sum and divides by the sequences (``per_sequence``) or the tokens (``per_token``).
Cross-entropy is the negative log-likelihood itself, so no factor of two enters (that one belongs
to ``MSELoss``, refused with every loss but cross-entropy).

curvlinops keeps its factors in private fields and counts every position of ``y`` as a loss term
(``ignore_index`` included): this module reads 3.0.x's fields, refuses labels equal to
``ignore_index``, and is the only module of the package that imports curvlinops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hub.artifact import Artifact
from laplace_hub.bridges._kfac_pool import Pool, build
from laplace_hub.errors import DataError, LaplaceHubError, MissingExtraError
from laplace_hub.manifest import BaseModelInfo, DType, Estimator, Normalization
from laplace_hub.producers import ComputeOptions
from laplace_hub.producers.compute import Batch
from laplace_hub.producers.distributed import rank_and_world
from laplace_hub.progress import progress

SUPPORTED = "3.0."  # the private fields read here are curvlinops 3.0.x's (test_curvlinops_canary)


def to_artifact(
    operators: Any,
    model: nn.Module,
    *,
    base_model: BaseModelInfo | str,
    dataset: str = "source",
    normalization: Normalization = "per_sequence",
    per_dataset: bool = False,
    dtype: DType = "float32",
    packed: bool = False,
    eig_rank: int | None = None,
    license: str | None = None,
    sources: Mapping[str, str] | None = None,
) -> Artifact:
    """A weight-space ``kron`` (or ``kron_eig``) artifact from curvlinops K-FAC operators.

    The counts the manifest records (sequences, tokens, batches) are read from each operator's
    data, whose ``X`` and ``y`` share their leading ``[sequences, positions]`` dimensions (token ids
    ``ids[:, :-1]`` and labels ``ids[:, 1:]``): curvlinops treats every position as a loss term.
    An operator whose factors are not computed yet has them computed here.

    Args:
        operators: One operator; a list of operators over disjoint parts of one dataset, pooled
            exactly (e.g. one per sequence length, which ``expand`` needs when sequences differ in
            length); or dataset name → either.
        model: The model whose ``nn.Linear`` modules the operators cover: names the modules and
            fingerprints their weights (SPEC.md §7). The operators may wrap it.
        base_model: Identity of the base model (a Hub id or local name, or the full record).
        dataset: The dataset's name when ``operators`` is not a mapping.
        normalization: ``per_sequence`` or ``per_token`` (SPEC.md §6).
        per_dataset: Store one block set per dataset instead of their pooled curvature.
        dtype: Dtype of the stored factors; dense factors only in float32 or float64.
        packed: Store the factors as upper triangles.
        eig_rank: Eigen-truncate every factor to this many eigenpairs (``kron_eig``).
        license: Licence of the curvature (SPDX id).
        sources: Dataset name → where it came from, for the manifest.

    Returns:
        An in-memory artifact: ``artifact.save(folder)`` writes it.

    Raises:
        MissingExtraError: curvlinops is not installed.
        LaplaceHubError: What the spec cannot hold (EKFAC, biases, a loss other than
            cross-entropy, ``fisher_type`` type-2 or forward-only, ``ignore_index`` labels,
            ``expand`` over sequences of several lengths in one operator), located at the
            parameter to change.

    Example:
        >>> import torch
        >>> from curvlinops import KFACLinearOperator
        >>> from torch import nn
        >>> mlp = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))
        >>> data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]  # six one-token sequences
        >>> op = KFACLinearOperator(mlp, nn.CrossEntropyLoss(reduction="sum"), [mlp[0].weight, mlp[2].weight],
        ...                         data, fisher_type="empirical", check_deterministic=False)
        >>> art = to_artifact(op, mlp, base_model="example/mlp")
        >>> sorted(art.manifest.modules), art.manifest.estimator.kind, art.manifest.datasets[0].tokens
        (['0', '2'], 'empirical', 6)

    """
    curvlinops = _curvlinops()
    groups = operators if isinstance(operators, Mapping) else {dataset: operators}
    names = {id(module): name for name, module in model.named_modules()}
    pools = {}
    for name, ops in groups.items():
        pools[name] = Pool()
        for op in [ops] if isinstance(ops, curvlinops.KFACLinearOperator) or not isinstance(ops, Sequence) else ops:
            pools[name].add(op, names, curvlinops)
    first = next(iter(pools.values()), None)
    if first is None or any(not pool.modules for pool in pools.values()):
        raise LaplaceHubError("no operator given (or a dataset without one)", location="operators")
    seeds = {pool.seed for pool in pools.values()}
    estimator = Estimator(
        kind="mc" if first.fisher_type == "mc" else "empirical",
        mc_samples=first.mc_samples if first.fisher_type == "mc" else None,
        seed=seeds.pop() if first.fisher_type == "mc" and len(seeds) == 1 else None,
    )
    return build(
        pools,
        base_model,
        estimator,
        normalization,
        per_dataset,
        sources,
        dtype=dtype,
        packed=packed,
        eig_rank=eig_rank,
        license=license,
    )


def compute_kfac(
    model: nn.Module,
    datasets: Mapping[str, Sequence[Batch]],
    targets: Mapping[str, nn.Module],
    options: ComputeOptions,
    base_model: BaseModelInfo,
    sources: Mapping[str, str] | None = None,
) -> Artifact:
    """:func:`~laplace_hub.producers.compute_artifact`, with curvlinops' ``KFACLinearOperator`` as the estimator.

    curvlinops counts every position it is fed and divides ``Σx`` by each batch's length, so the
    padded batches are cut into their labelled sequences and regrouped by length, one operator per
    length (each one pass over its sequences), and the operators are pooled exactly
    (:func:`to_artifact`): the artifact equals the native producer's up to rounding, and to its
    MC draws with ``estimator="mc"``. curvlinops sums in the model's dtype: pass a float64 model
    for float64 sums.

    Args:
        model: A causal LM whose forward takes ``input_ids`` and returns ``.logits``, whole on one device.
        datasets: Dataset name → batches (``input_ids``, ``attention_mask``, ``labels``); labels
            of -100 only on trailing padding (no prompt masking: curvlinops counts every position).
        targets: Module name → the ``nn.Linear`` to cover (GPT-2's ``Conv1D`` is not curvlinops').
        options: What to compute: ``kron`` (``eig_rank``: ``kron_eig``) of weights, estimator
            ``empirical`` or ``mc``; no sketch.
        base_model: Identity of the base model (the fingerprint is filled in here).
        sources: Dataset name → where it came from, for the manifest.

    Returns:
        An in-memory artifact.

    Raises:
        LaplaceHubError: An option curvlinops does not compute, located at that option.
        DataError: A dataset has prompt-masked or left-padded labels, or no labelled token.

    """
    check_options(options)
    if rank_and_world()[1] > 1:
        raise LaplaceHubError("the curvlinops backend runs on one process; start it without torchrun")
    curvlinops = _curvlinops()
    if not targets:
        raise LaplaceHubError("no target modules selected", location="targets")
    if not datasets:
        raise DataError("no dataset given", location="source")
    for module in targets.values():
        if not isinstance(module, nn.Linear):  # transformers' Conv1D is no nn.Linear, nor curvlinops'
            raise LaplaceHubError(f"curvlinops covers nn.Linear, not {type(module).__name__}", location="targets")
        if module.weight.dtype in (torch.float16, torch.bfloat16):
            raise LaplaceHubError(f"curvlinops would sum the factors in {module.weight.dtype}", location="model")
    wrapper = _NextTokenLogits(model)
    names = {id(module): name for name, module in targets.items()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for module in targets.values():
        module.weight.requires_grad_(True)
    model.eval()
    pools: dict[str, Pool] = {}
    try:
        for name, batches in datasets.items():
            pools[name] = pool = Pool()
            groups = _by_length(batches, name)
            size = max(int(b["input_ids"].shape[0]) for b in batches)
            for length, sequences in progress(groups.items(), desc=f"curvature [{name}] (curvlinops)", unit="length"):
                chunks = [sequences[i : i + size] for i in range(0, len(sequences), size)]
                data = [(torch.stack([x for x, _ in c]), torch.stack([y for _, y in c])) for c in chunks]
                op = curvlinops.KFACLinearOperator(
                    wrapper,
                    nn.CrossEntropyLoss(reduction="sum"),
                    [module.weight for module in targets.values()],
                    data,
                    check_deterministic=False,
                    seed=options.seed,
                    fisher_type=options.estimator,
                    mc_samples=options.mc_samples if options.estimator == "mc" else 1,
                    kfac_approx=options.kfac_approx,
                    num_data=len(sequences),
                    num_per_example_loss_terms=length,
                )
                op.compute_kronecker_factors()
                pool.add(op, names, curvlinops)
            pool.counts.batches = len(batches)  # the batches given, as the native producer counts them
    finally:
        for name, flag in requires.items():
            model.get_parameter(name).requires_grad_(flag)
    estimator = Estimator(
        kind=options.estimator,
        mc_samples=options.mc_samples if options.estimator == "mc" else None,
        seed=options.seed,
    )
    return build(
        pools,
        base_model,
        estimator,
        options.normalization,
        options.per_dataset,
        sources,
        dtype=options.dtype,
        packed=options.packed,
        eig_rank=options.eig_rank,
        license=options.license,
    )


def check_options(options: ComputeOptions) -> None:
    """Refuse the options that :func:`compute_kfac` cannot honour, before any model is loaded.

    Raises:
        LaplaceHubError: Located at the option to change (``structure``, ``parameterization``,
            ``eig_sketch``, ``estimator``), or at the one the options' own rules name.

    Example:
        >>> check_options(ComputeOptions(structure="kron", eig_rank=4))  # kron_eig: fine
        >>> check_options(ComputeOptions(structure="diag"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        laplace_hub.errors.LaplaceHubError: structure: the curvlinops backend computes kron (kron_eig: `eig_rank`), ...

    """
    options.check()
    for parameter, ok, what in (
        ("structure", options.structure == "kron", f"computes kron (kron_eig: `eig_rank`), not {options.structure}"),
        ("parameterization", options.parameterization == "weight", "computes weight-space curvature only"),
        ("eig_sketch", not options.eig_sketch, "computes dense factors; a sketch is the native backend's"),
        ("estimator", options.estimator in ("empirical", "mc"), f"has no {options.estimator} estimator"),
    ):
        if not ok:
            raise LaplaceHubError(f"the curvlinops backend {what}", location=parameter)


class _NextTokenLogits(nn.Module):
    """A causal LM as curvlinops wants it: logits with the classes on dim 1."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits.permute(0, 2, 1)


def _by_length(batches: Sequence[Batch], dataset: str) -> dict[int, list[tuple[Tensor, Tensor]]]:
    """Each labelled sequence as ``(input_ids, labels)`` without padding, grouped by its length.

    Position ``t`` counts when ``labels[t + 1]`` is a label (as in the native producer); those
    positions must be a prefix of the sequence, which causal attention then computes exactly as
    in the padded batch.
    """
    groups: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        attention = batch.get("attention_mask", torch.ones_like(ids))
        for row in range(ids.shape[0]):
            valid = labels[row, 1:] != -100
            k = int(valid.sum())
            if k == 0:
                continue
            if not valid[:k].all() or not attention[row, : k + 1].all():
                raise DataError(
                    "curvlinops counts every position it is fed: labels of -100 or padding before a label "
                    "(prompt masking, left padding) need the native backend",
                    location=f"source {dataset!r}",
                )
            groups.setdefault(k, []).append((ids[row, :k], labels[row, 1 : k + 1]))
    if not groups:
        raise DataError(f"dataset {dataset!r} holds no labelled tokens", location=f"source {dataset!r}")
    return dict(sorted(groups.items()))


def _curvlinops() -> Any:
    """curvlinops, imported on first use; 3.0.x only (its private factor fields are read)."""
    try:
        import curvlinops
    except ImportError as e:
        raise MissingExtraError("curvlinops-for-pytorch", "curvlinops") from e
    try:
        found = version("curvlinops-for-pytorch")
    except PackageNotFoundError:  # a source checkout: the canary test guards the fields
        return curvlinops
    if not found.startswith(SUPPORTED):
        raise LaplaceHubError(
            f"the bridge reads curvlinops {SUPPORTED}x's Kronecker factors, found {found}; "
            "install 'curvlinops-for-pytorch>=3.0,<3.1'"
        )
    return curvlinops


__all__ = ["check_options", "compute_kfac", "to_artifact"]
