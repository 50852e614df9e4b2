"""Kronfluence → laplace-hub: a Kronfluence factor folder as a weight-space ``kron`` artifact.

Kronfluence (``Analyzer.fit_covariance_matrices`` / ``fit_all_factors``) writes one safetensors file
per factor kind in ``<output_dir>/<analysis>/factors_<name>/``, keyed by module name, with its
settings in ``factor_arguments.json`` and the dataset's size in ``covariance_dataset_metadata.json``.
Only those files are read (safetensors and bounded JSON, never pickle); Kronfluence itself is not
imported.

Scale (SPEC.md §6, docs/bridges.md). ``activation_covariance`` is ``Σ x xᵀ`` over the positions the
task's attention mask keeps, ``num_activation_covariance_processed`` their count: our ``expand``
``Σx`` times the tokens. ``gradient_covariance`` is ``Σ g gᵀ`` of the gradients of the task's
training loss with respect to each module's output, so a task whose loss is the *summed*
cross-entropy (as Kronfluence's examples are) gives our per-token sum; it is divided by the
sequences (``per_sequence``, the dataset's size) or the tokens (``per_token``). The positions
counted must be those with a label: feed ``ids[:-1]`` with labels ``ids[1:]`` and mask padding.
Every module named in the files must be an ``nn.Linear`` of the model; one with a bias has its
ones-column dropped (the weight block of the augmented factor). EK-FAC's corrected eigenvalues
(``lambda_matrix``) have no structure in the format: the K-FAC covariances of a folder holding
them are exported, with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from laplace_hub.artifact import Artifact
from laplace_hub.artifact.files import read_json_bounded
from laplace_hub.bridges._kfac_pool import Counts, Pool, build
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import BaseModelInfo, DType, Estimator, Normalization

PROVENANCE_KEY = "laplace-hub.bridges.kronfluence"
SETTINGS_NAME = "factor_arguments.json"
DATASET_NAME = "covariance_dataset_metadata.json"
COVARIANCES = ("activation_covariance", "gradient_covariance")
COUNTS = ("num_activation_covariance_processed", "num_gradient_covariance_processed")
_JSON_LIMIT = 2**20


def to_artifact(
    folder: str | Path,
    model: nn.Module,
    *,
    base_model: BaseModelInfo | str,
    batch_size: int,
    dataset: str = "source",
    normalization: Normalization = "per_sequence",
    dtype: DType = "float32",
    packed: bool = False,
    eig_rank: int | None = None,
    license: str | None = None,
    source: str | None = None,
) -> Artifact:
    """A weight-space ``kron`` (or ``kron_eig``) artifact from a Kronfluence factor folder.

    Args:
        folder: The ``factors_<name>`` folder Kronfluence wrote.
        model: The model the factors were fitted on, prepared by Kronfluence or not (its weights
            are fingerprinted; each covered module must be an ``nn.Linear`` of that name).
        base_model: The base model's Hub id (or its :class:`BaseModelInfo`).
        batch_size: The ``per_device_batch_size`` of the fit (Kronfluence does not record it),
            for the manifest's batch count.
        dataset: The dataset's name in the manifest.
        normalization: ``per_sequence`` (λ counts sequences) or ``per_token``.
        dtype: The stored factors' dtype.
        packed: Store symmetric factors packed (upper triangle).
        eig_rank: Keep each factor's top ``eig_rank`` eigenpairs (``kron_eig``), as ``compress``.
        license: The curvature's licence, for the manifest.
        source: Where the data came from, for the manifest.

    Raises:
        LaplaceHubError: A setting that cannot be converted (named), a missing or inconsistent
            file, or a module the model does not have.

    """
    root = Path(folder)
    settings = _json(root / SETTINGS_NAME)
    estimator = _estimator(settings)
    sequences = _sequences(root, settings)
    covariances = {name: _tensors(root, name) for name in (*COVARIANCES, *COUNTS)}
    modules = _modules(model, covariances["activation_covariance"])
    tokens = _tokens(covariances, modules)
    pool = Pool(kfac_approx="expand", fisher_type=estimator.kind, modules=dict(modules))
    pool.counts = Counts(sequences=sequences, tokens=tokens, batches=math.ceil(sequences / max(1, batch_size)))
    for name, module in modules.items():
        inputs = covariances["activation_covariance"][name].double()
        pool.inputs[name] = inputs[: module.in_features, : module.in_features]  # a bias's ones-column dropped
        pool.outputs[name] = covariances["gradient_covariance"][name].double()
        _check_shapes(name, module, inputs, pool.outputs[name])
    if (root / "lambda_matrix.safetensors").is_file():
        warnings.warn(
            "the EK-FAC corrected eigenvalues (lambda_matrix) are not exported: the format has no structure for "
            "them yet; the artifact holds the K-FAC covariances of the same fit",
            stacklevel=2,
        )
    return build(
        {dataset: pool},
        base_model,
        estimator,
        normalization,
        False,
        {dataset: source} if source else None,
        dtype=dtype,
        packed=packed,
        eig_rank=eig_rank,
        license=license,
        provenance=(PROVENANCE_KEY, f"factor folder {root.name}, strategy {settings.get('strategy')}"),
    )


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LaplaceHubError(f"no {path.name}: not a Kronfluence factor folder", location=str(path.parent))
    data = read_json_bounded(path, _JSON_LIMIT, code="bridge.kronfluence")
    if not isinstance(data, dict):
        raise LaplaceHubError("is not a JSON object", location=str(path))
    return data


def _estimator(settings: Mapping[str, Any]) -> Estimator:
    """The settings that change what the covariances mean, refused by name where they cannot be converted."""
    strategy = settings.get("strategy")
    if strategy not in ("kfac", "ekfac"):
        raise LaplaceHubError(
            f"strategy {strategy!r} has no Kronecker covariances; fit with strategy 'kfac' or 'ekfac'",
            location="strategy",
        )
    for key, allowed in (("amp_dtype", None), ("has_shared_parameters", False)):
        if settings.get(key, allowed) != allowed:
            raise LaplaceHubError(f"{key}={settings[key]!r} cannot be converted; fit with {allowed}", location=key)
    for key in ("covariance_data_partitions", "covariance_module_partitions"):
        if settings.get(key, 1) != 1:
            raise LaplaceHubError(f"{key}={settings[key]!r}: aggregate the partitions first", location=key)
    if settings.get("use_empirical_fisher"):
        return Estimator(kind="empirical")
    return Estimator(kind="mc", mc_samples=1)  # labels drawn from the model by Kronfluence, unseeded


def _sequences(root: Path, settings: Mapping[str, Any]) -> int:
    info = _json(root / DATASET_NAME)
    size, indices = info.get("dataset_size"), info.get("indices")
    if not isinstance(size, int) or size < 1 or indices is not None:
        raise LaplaceHubError(
            "the covariances must come from a whole dataset (no indices); cannot count its sequences",
            location=str(root / DATASET_NAME),
        )
    limit = settings.get("covariance_max_examples")
    return min(size, limit) if isinstance(limit, int) else size


def _tensors(root: Path, name: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    path = root / f"{name}.safetensors"
    if not path.is_file():
        raise LaplaceHubError(f"no {path.name}: fit the covariance matrices first", location=str(root))
    try:
        with safe_open(str(path), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LaplaceHubError(f"cannot be read as safetensors ({e})", location=str(path)) from e


def _modules(model: nn.Module, covariances: Mapping[str, Tensor]) -> dict[str, nn.Linear]:
    named = dict(model.named_modules())
    modules: dict[str, nn.Linear] = {}
    for name in covariances:
        module = getattr(named.get(name), "original_module", named.get(name))  # prepare_model's TrackedModule
        if not isinstance(module, nn.Linear):
            what = "is not an nn.Linear" if module is not None else "is not a module of the model"
            raise LaplaceHubError(f"{what}; laplace-hub covers linear weights", location=name)
        modules[name] = module
    if not modules:
        raise LaplaceHubError("the factor files hold no module", location="activation_covariance")
    return modules


def _tokens(covariances: Mapping[str, Mapping[str, Tensor]], modules: Mapping[str, nn.Module]) -> int:
    counts = {int(covariances[kind][name].sum()) for kind in COUNTS for name in modules}
    if len(counts) != 1 or set(covariances["gradient_covariance"]) != set(modules):
        raise LaplaceHubError(
            f"modules or counts differ between the factor files ({sorted(counts)} positions): one fit per folder",
            location="num_activation_covariance_processed",
        )
    return counts.pop()


def _check_shapes(name: str, module: nn.Linear, inputs: Tensor, outputs: Tensor) -> None:
    width = module.in_features + (module.bias is not None)
    if tuple(inputs.shape) != (width, width) or tuple(outputs.shape) != (module.out_features,) * 2:
        raise LaplaceHubError(
            f"factors of shape {list(inputs.shape)} and {list(outputs.shape)} do not fit the module's "
            f"{[module.out_features, module.in_features]} weight",
            location=name,
        )


__all__ = ["to_artifact"]
