"""laplace-torch ↔ laplace-hub: fitted ``KronLaplace`` / ``DiagLaplace`` as artifacts, diag artifacts as priors.

:func:`from_laplace` writes the likelihood curvature of a fitted laplace-torch posterior over
``nn.Linear`` weights as a weight-space ``kron`` or ``diag`` artifact; :func:`to_prior_precision`
turns an artifact's diagonal blocks into the diagonal prior precision laplace-torch accepts, over
a model's weights or over the LoRA factors of its PEFT adapter.

Scale (SPEC.md §6, docs/bridges.md). laplace-torch's ``H`` is the curvature of the summed
negative log-likelihood (``CrossEntropyLoss(reduction="sum")``) over its ``n_data`` data points:
the sum of ``g gᵀ`` (Kronecker: ``Σₙ g gᵀ ⊗ mean x xᵀ``). A stored block is that sum over the
sequences (``per_sequence``) or tokens (``per_token``), so ``P = H / n_data`` for one label per
data point, and laplace-torch's likelihood precision ``H / temperature`` is ``λ · P`` with
``λ = n_data / temperature``. No factor of two enters: cross-entropy is the negative
log-likelihood itself (laplace-torch's ``½`` belongs to ``MSELoss``, i.e. regression, refused).

laplace-torch keeps its state in positional lists: this module reads ``la.params``, ``la.H`` /
``la.H_facs`` (one ``[output, input]`` factor pair per parameter), ``la.n_data``, the backend and
the constructor's ``asdl_fisher_kwargs``, and imports ``laplace`` only inside its functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hub.artifact import Artifact, ArtifactBuilder, software_versions
from laplace_hub.consumers import adapted_modules
from laplace_hub.consumers.regularizer import AdaptedModule, check_base_weights
from laplace_hub.curvature import (
    Block,
    BlockSum,
    DenseFactor,
    DiagBlock,
    DiagLowRankBlock,
    KronBlock,
    WeightBlock,
)
from laplace_hub.errors import LaplaceHubError, MissingExtraError, ModelMismatchError
from laplace_hub.fingerprint import fingerprint_modules
from laplace_hub.manifest import (
    BaseModelInfo,
    DatasetInfo,
    DType,
    Estimator,
    LoraParameterization,
    Normalization,
    WeightParameterization,
)

PROVENANCE_KEY = "laplace-hub.bridges.laplace_torch"
# asdl_fisher_kwargs that the bridge understands (laplace-torch passes them to the backend's K-FAC)
KNOWN_KWARGS = frozenset({"mc_samples", "n_mc_samples", "seed", "kfac_approx"})


def from_laplace(
    la: Any,
    model: nn.Module,
    *,
    base_model: BaseModelInfo | str,
    normalization: Normalization = "per_sequence",
    dataset: str | DatasetInfo = "source",
    dtype: DType = "float32",
    packed: bool = False,
    license: str | None = None,
) -> Artifact:
    """A weight-space ``kron`` or ``diag`` artifact from a fitted laplace-torch ``KronLaplace`` / ``DiagLaplace``.

    Every parameter of the Laplace approximation (``la.params``: the model's parameters that
    require grad) must be the weight of an ``nn.Linear`` of ``model``: switch the others off with
    ``requires_grad_(False)`` before fitting. The stored block is laplace-torch's ``H`` for that
    weight divided by the data points (``per_sequence``) or the tokens (``per_token``); the
    temperature and the prior are not part of it (docs/bridges.md).

    Args:
        la: A fitted ``KronLaplace`` or ``DiagLaplace`` (``subset_of_weights="all"``) with
            ``likelihood="classification"``, and an empirical (``*EF``) or sampled
            (``*GGN(stochastic=True)``) Fisher.
        model: The model the Laplace approximation was fitted over: names the modules and
            fingerprints their weights (SPEC.md §7), which must still be those of the fit.
        base_model: Identity of the base model (a Hub id or local name, or the full record).
        normalization: ``per_sequence`` or ``per_token`` (SPEC.md §6).
        dataset: The dataset's name, with ``la.n_data`` sequences of one label each (as many
            tokens; laplace-torch records no batch count, so 1 is written); or its full record,
            whose ``sequences`` must equal ``la.n_data`` and whose ``tokens`` count the labels.
        dtype: Dtype of the stored tensors (Kronecker factors in float32 or float64).
        packed: Store Kronecker factors as upper triangles.
        license: Licence of the curvature (SPDX id).

    Returns:
        An in-memory artifact: ``artifact.save(folder)`` writes it.

    Raises:
        MissingExtraError: laplace-torch is not installed.
        LaplaceHubError: What the spec cannot hold (regression, the exact GGN or the Hessian,
            last-layer or subnetwork Laplace, a bias or a parameter of another layer, a model
            changed since the fit), located at the argument or parameter to change.

    Example:
        >>> import torch
        >>> from laplace import Laplace
        >>> from laplace.curvature import CurvlinopsEF
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> mlp = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))
        >>> data = DataLoader(TensorDataset(torch.randn(6, 4), torch.randint(0, 3, (6,))), batch_size=3)
        >>> la = Laplace(mlp, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvlinopsEF)
        >>> la.fit(data)
        >>> art = from_laplace(la, mlp, base_model="example/mlp")
        >>> sorted(art.manifest.modules), art.manifest.estimator.kind, art.manifest.datasets[0].sequences
        (['0', '2'], 'empirical', 6)

    """
    laplace = _laplace()
    kron = _structure(la, laplace)
    if la.likelihood != "classification":
        raise LaplaceHubError(
            f"the spec's loss is cross-entropy, laplace-torch's 'classification' likelihood; got {la.likelihood!r}",
            location="la",
        )
    estimator, kfac_approx = _estimator(la, laplace, kron)
    covered = _covered(la, model, kron)
    n_data = int(la.n_data)
    info = _dataset_info(dataset, n_data)
    if kron and kfac_approx == "reduce" and normalization == "per_token":
        raise LaplaceHubError(
            "reduce aggregates over a sequence; `normalization` per_token needs expand", location="normalization"
        )
    count = info.sequences if normalization == "per_sequence" else info.tokens
    builder = ArtifactBuilder(dtype=dtype, packed=packed)
    blocks = _kron_blocks(la, covered, count) if kron else _diag_blocks(la, covered, count)
    for (name, module), block in zip(covered, blocks, strict=True):
        builder.add(name, (module.out_features, module.in_features), block)
    if isinstance(base_model, str):
        base_model = BaseModelInfo(repo_id=base_model)
    backend = type(la.backend).__name__
    return builder.build(
        base_model=base_model.model_copy(update={"fingerprint": fingerprint_modules(dict(covered))}),
        parameterization=WeightParameterization(kind="weight"),
        estimator=estimator,
        loss="cross_entropy",
        normalization=normalization,
        kfac_approx=kfac_approx if kron else None,
        datasets=[info],
        datasets_combined="summed",
        license=license,
        software={
            **software_versions(),
            **_version("laplace-torch"),
            PROVENANCE_KEY: f"{type(la).__name__}, backend {backend}, n_data {n_data}, temperature {la.temperature}",
        },
    )


def to_prior_precision(
    artifact: Artifact,
    model: nn.Module,
    *,
    strength: float,
    dataset: str | None = None,
    adapter: str = "default",
    approximate: bool = False,
    default: float | None = None,
    check_fingerprint: bool = True,
) -> Tensor:
    """The diagonal prior precision ``λ · diag(P)`` that laplace-torch accepts for ``model``'s parameters.

    laplace-torch's ``prior_precision`` is a scalar, one value per parameter tensor, or a vector
    over all parameters that require grad, in ``model.parameters()`` order: this returns that
    vector. A parameter is either the weight of an ``nn.Linear`` the artifact covers (its block's
    diagonal), or a LoRA factor of ``adapter`` on such a module (the diagonal of the block's
    Gauss-Newton projection onto ``(A, B)`` at the model's current factors, SPEC.md §5: at the
    usual init ``B = 0`` that is zero for ``A``). Pass it as ``prior_precision=`` to a
    ``DiagLaplace`` (or ``FullLaplace``); ``KronLaplace`` takes no diagonal prior.

    Args:
        artifact: A weight-space artifact.
        model: The model laplace-torch will fit over (its parameters that require grad).
        strength: ``λ``; ``la.n_data`` (over the temperature) reproduces the likelihood
            precision of the data the artifact was computed on (docs/bridges.md).
        dataset: One dataset's blocks; ``None`` combines all as the manifest says.
        adapter: The PEFT adapter whose LoRA factors are covered.
        approximate: Keep only the diagonal of blocks that are not diagonal (``kron``,
            ``kron_eig``, ``diag_lowrank``): an approximation that drops every correlation;
            without it they are refused.
        default: Prior precision of parameters the artifact does not cover; ``None`` refuses them.
        check_fingerprint: Refuse LoRA base weights that differ from the artifact's (checked
            when the adapter covers all of its modules; plain weights are the parameters
            inferred, so they are not compared).

    Returns:
        A 1-D tensor of the model's dtype and device, one value per parameter that requires grad.

    Raises:
        LaplaceHubError: a non-diagonal block without ``approximate``, a ``lora`` artifact, a
            parameter the artifact does not cover without ``default``, or a negative ``strength``.
        ModelMismatchError: a shape or the fingerprint differs from the artifact's.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from laplace_hub.artifact import ArtifactBuilder, minimal_fields
        >>> from laplace_hub.curvature import DiagBlock
        >>> mlp = nn.Sequential(nn.Linear(3, 2, bias=False))
        >>> builder = ArtifactBuilder()
        >>> builder.add("0", (2, 3), DiagBlock(torch.full((2, 3), 0.5)))
        >>> to_prior_precision(builder.build(**minimal_fields(kfac_approx=None)), mlp, strength=4.0)
        tensor([2., 2., 2., 2., 2., 2.])

    """
    if not (math.isfinite(strength) and strength >= 0):
        raise LaplaceHubError(f"strength must be finite and ≥ 0, got {strength}", location="strength")
    if isinstance(artifact.manifest.parameterization, LoraParameterization):
        raise LaplaceHubError(
            "a lora-parameterised artifact holds a precision at its stored init, a prior mean laplace-torch "
            "does not take from it; use a weight-space artifact",
            location="artifact",
        )
    modules = artifact.manifest.modules
    lora = {m.name: m for m in adapted_modules(model, adapter) if m.name in modules}
    _check_lora(artifact, model, lora, check_fingerprint)
    factors = {id(m.lora_a): (m, 0) for m in lora.values()} | {id(m.lora_b): (m, 1) for m in lora.values()}
    weights = {id(mod.weight): name for name, mod in _linears(model)}
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    pieces = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors:
            m, which = factors[id(p)]
            if m.name not in pairs:
                pairs[m.name] = _lora_diagonals(artifact.block(m.name, dataset, dtype=torch.float64), m, approximate)
            piece = strength * pairs[m.name][which]
        elif id(p) in weights and weights[id(p)] in modules:
            module = weights[id(p)]
            if modules[module].shape != list(p.shape):
                raise ModelMismatchError(
                    f"shape {list(p.shape)} differs from the artifact's {modules[module].shape}", location=name
                )
            piece = strength * _diagonal(artifact.block(module, dataset, dtype=torch.float64), approximate, module)
        elif default is not None:
            piece = torch.full(p.shape, float(default), dtype=torch.float64)
        else:
            raise LaplaceHubError(
                "the artifact covers no such parameter (nn.Linear weights of its modules, and the LoRA factors "
                f"of adapter {adapter!r} on them): pass `default`, or requires_grad_(False) to leave it out of the "
                "Laplace approximation",
                location=name,
            )
        pieces.append(piece.reshape(-1))
    if not pieces:
        raise LaplaceHubError("the model has no parameter that requires grad", location="model")
    first = next(p for p in model.parameters() if p.requires_grad)
    return torch.cat(pieces).to(device=first.device, dtype=first.dtype)


def _laplace() -> Any:
    """laplace-torch, imported on first use."""
    try:
        import laplace
        import laplace.curvature
    except ImportError as e:
        raise MissingExtraError("laplace-torch", "laplace-torch") from e
    return laplace


def _version(package: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {package: version(package)}
    except PackageNotFoundError:
        return {}


def _structure(la: Any, laplace: Any) -> bool:
    """Whether ``la`` is Kronecker (else diagonal); refuses every other kind of Laplace, and unfitted ones."""
    from laplace.lllaplace import LLLaplace
    from laplace.subnetlaplace import SubnetLaplace

    if isinstance(la, LLLaplace | SubnetLaplace) or not isinstance(la, laplace.KronLaplace | laplace.DiagLaplace):
        raise LaplaceHubError(
            f"expected a KronLaplace or DiagLaplace with subset_of_weights='all', got {type(la).__name__}: "
            "the spec's blocks are Kronecker or diagonal per weight (switch other parameters off with "
            "requires_grad_(False) instead of last-layer or subnetwork Laplace)",
            location="la",
        )
    kron = isinstance(la, laplace.KronLaplace)
    if not la.n_data or (kron and la.H_facs is None):
        raise LaplaceHubError("the Laplace approximation is not fitted: call la.fit(train_loader)", location="la")
    return kron


def _estimator(la: Any, laplace: Any, kron: bool) -> tuple[Estimator, str]:
    """The estimator the backend computed, and ``kfac_approx``; refuses curvature with no spec estimator."""
    curvature = laplace.curvature
    backend = la.backend
    extra = dict(getattr(la, "_asdl_fisher_kwargs", None) or {})
    unknown = sorted(set(extra) - KNOWN_KWARGS)
    if unknown:
        raise LaplaceHubError(
            f"asdl_fisher_kwargs {unknown} change what the backend computes in ways the bridge cannot check "
            f"(it knows {sorted(KNOWN_KWARGS)})",
            location="la",
        )
    curvlinops = isinstance(backend, getattr(curvature, "CurvlinopsInterface", ()))
    kfac_approx = str(extra.get("kfac_approx", "expand")) if curvlinops else "expand"
    if isinstance(backend, curvature.EFInterface):
        return Estimator(kind="empirical"), kfac_approx
    if isinstance(backend, curvature.GGNInterface) and getattr(backend, "stochastic", False):
        if isinstance(backend, getattr(curvature, "BackPackInterface", ())):
            samples, seed = 1, None  # BackPACK's DiagGGNMC() and KFAC() draw one sample
        elif curvlinops:  # K-FAC through curvlinops' operator; the diagonal through torch.func
            samples = extra.get("mc_samples", 1) if kron else backend.num_samples
            seed = extra.get("seed") if kron else None
        elif isinstance(backend, getattr(curvature, "AsdlInterface", ())):
            samples, seed = extra.get("n_mc_samples", 1), extra.get("seed")
        else:
            raise LaplaceHubError(
                f"cannot tell how many MC samples {type(backend).__name__} draws; use a Curvlinops, BackPack or "
                "Asdl backend",
                location="la",
            )
        return Estimator(kind="mc", mc_samples=int(samples), seed=None if seed is None else int(seed)), kfac_approx
    raise LaplaceHubError(
        f"{type(backend).__name__} computes the exact GGN (type-2 Fisher) or the Hessian, which have no estimator in "
        "spec 1.2 (empirical, mc): fit with an empirical-Fisher backend (e.g. backend=CurvlinopsEF) or a sampled "
        "one (backend_kwargs={'stochastic': True})",
        location="la",
    )


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


def _covered(la: Any, model: nn.Module, kron: bool) -> list[tuple[str, nn.Linear]]:
    """``(module name, module)`` for each parameter of ``la``, in its order; refuses what is no ``nn.Linear`` weight."""
    names = {id(p): name for name, p in model.named_parameters()}
    weights = {id(module.weight): (name, module) for name, module in _linears(model)}
    covered = []
    for p in la.params:
        name = names.get(id(p))
        if name is None:
            raise LaplaceHubError("the Laplace approximation covers a parameter that is not `model`'s", location="la")
        if id(p) not in weights:
            raise LaplaceHubError(
                "not the weight of an nn.Linear (the spec's blocks cover nn.Linear weights: no bias, no other "
                "layer); fit with requires_grad_(False) on it",
                location=name,
            )
        module_name, module = weights[id(p)]
        if ".lora_A." in f".{name}" or ".lora_B." in f".{name}":
            raise LaplaceHubError(
                "curvature over LoRA factors is not exported: the spec's lora parameterization is a precision at a "
                "stored init; fit over the base weights, or use to_prior_precision for LoRA inference",
                location=name,
            )
        if kron and module.bias is not None:
            raise LaplaceHubError(
                "laplace-torch's K-FAC adds a block for the bias of a covered layer even when it is frozen, which "
                "shifts its factor list; the bridge takes Kronecker curvature of layers without bias",
                location=name,
            )
        covered.append((module_name, module))
    current = torch.cat([p.detach().reshape(-1) for p in la.params])
    if not torch.equal(current, la.mean.detach().reshape(-1).to(current)):
        raise LaplaceHubError(
            "the model's weights changed since the fit: the curvature belongs to the weights it was computed at",
            location="model",
        )
    return covered


def _dataset_info(dataset: str | DatasetInfo, n_data: int) -> DatasetInfo:
    if isinstance(dataset, str):
        return DatasetInfo(name=dataset, sequences=n_data, tokens=n_data, batches=1)
    if dataset.sequences != n_data:
        raise LaplaceHubError(
            f"the record says {dataset.sequences} sequences, la.n_data {n_data}: laplace-torch counts one data "
            "point per sequence",
            location="dataset",
        )
    return dataset


def _host(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.promote_types(tensor.dtype, torch.float32))


def _diag_blocks(la: Any, covered: list[tuple[str, nn.Linear]], count: int) -> list[DiagBlock]:
    """``la.H``, the diagonal over ``la.params`` flattened row-major, cut into one ``[d_out, d_in]`` block each."""
    h = _host(la.H)
    blocks, offset = [], 0
    for _, module in covered:
        size = module.weight.numel()
        blocks.append(DiagBlock(h[offset : offset + size].reshape(module.weight.shape) / count))
        offset += size
    return blocks


def _kron_blocks(la: Any, covered: list[tuple[str, nn.Linear]], count: int) -> list[KronBlock]:
    """``la.H_facs``: one ``[Σ g gᵀ, mean x xᵀ]`` pair per weight (laplace-torch's order: output side first)."""
    kfacs = la.H_facs.kfacs
    if len(kfacs) != len(covered):
        raise LaplaceHubError(
            f"laplace-torch's Kronecker factors ({len(kfacs)}) do not line up with its parameters ({len(covered)})",
            location="la",
        )
    blocks = []
    for (name, module), factors in zip(covered, kfacs, strict=True):
        d_out, d_in = module.out_features, module.in_features
        dense = [_host(f if f.dim() == 2 else torch.diag(f.reshape(-1))) for f in factors]
        if len(dense) == 1 and d_out == d_in == 1:  # a 1 × 1 weight: laplace-torch keeps one 1 × 1 factor
            dense.append(torch.ones(1, 1, dtype=dense[0].dtype))
        if len(dense) != 2 or dense[0].shape != (d_out, d_out) or dense[1].shape != (d_in, d_in):
            raise LaplaceHubError(
                f"laplace-torch's factors {[tuple(f.shape) for f in factors]} are not [{d_out}², {d_in}²]",
                location=name,
            )
        blocks.append(KronBlock(DenseFactor(dense[1]), DenseFactor(dense[0] / count)))
    return blocks


def _diagonal(block: Block, approximate: bool, module: str) -> Tensor:
    """A weight block's diagonal as a ``[m, n]`` matrix: exact for ``diag`` (and sums), else with ``approximate``."""
    if isinstance(block, DiagBlock):
        return block.diagonal
    if isinstance(block, BlockSum):
        return torch.stack([_diagonal(term, approximate, module) for term in block.terms]).sum(0)
    if not approximate:
        structure = getattr(block, "structure", type(block).__name__)
        raise LaplaceHubError(
            f"a {structure} block is not diagonal, and laplace-torch's prior precision is a scalar, one value per "
            "layer, or a diagonal: use a diag artifact, or pass approximate=True to keep the block's diagonal",
            location=module,
        )
    if isinstance(block, KronBlock):
        return torch.outer(block.output.dense().diagonal(), block.input.dense().diagonal())
    if isinstance(block, DiagLowRankBlock):
        return block.diagonal + block.lowrank.square().sum(0)
    raise LaplaceHubError(f"a {type(block).__name__} is no weight-space block", location=module)


def _lora_diagonals(block: Block, m: AdaptedModule, approximate: bool) -> tuple[Tensor, Tensor]:
    """The diagonals over ``(A, B)`` of a weight block's projection at the adapter's current factors."""
    if isinstance(block, BlockSum):
        parts = [_lora_diagonals(term, m, approximate) for term in block.terms]
        return torch.stack([a for a, _ in parts]).sum(0), torch.stack([b for _, b in parts]).sum(0)
    if not isinstance(block, WeightBlock):
        raise LaplaceHubError(f"a {type(block).__name__} is no weight-space block", location=m.name)
    pair = block.project_lora(m.lora_a.detach().double(), m.lora_b.detach().double(), m.scaling)
    return _diagonal(pair.a, approximate, m.name), _diagonal(pair.b, approximate, m.name)


def _check_lora(artifact: Artifact, model: nn.Module, lora: dict[str, AdaptedModule], check_fingerprint: bool) -> None:
    modules = artifact.manifest.modules
    for name, m in lora.items():
        if list(m.base_weight.shape) != modules[name].shape:
            raise ModelMismatchError(
                f"shape {list(m.base_weight.shape)} differs from the artifact's {modules[name].shape}", location=name
            )
    if check_fingerprint:
        check_base_weights(artifact, model, {name: m.base_layer for name, m in lora.items()})


__all__ = ["from_laplace", "to_prior_precision"]
