"""The Kronfluence bridge against Kronfluence's own fit and against this library's producer.

Kronfluence fits K-FAC (and EK-FAC) covariances on a tiny Llama; the converted artifact must hold
exactly Kronfluence's matrices (sums over counts) and equal the artifact our producer computes on
the same sequences with the same estimator; what cannot be converted is refused by name.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from laplace_hub.errors import LaplaceHubError
from laplace_hub.validate import validate
from tests.conftest import tiny_llama

kronfluence = pytest.importorskip("kronfluence", reason="the bridge's peer: pip install --no-deps kronfluence==1.0.1")

TARGETS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
SEQUENCES = [[3, 7, 2, 9, 4, 11], [5, 5, 8, 20, 13, 2], [17, 4, 4, 6, 19, 8], [2, 12, 15, 9, 10, 3]]


class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Each sequence as Kronfluence's task sees it: inputs ids[:-1], labels ids[1:], every position kept."""

    def __len__(self) -> int:
        return len(SEQUENCES)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(SEQUENCES[i])
        return {"input_ids": ids[:-1], "labels": ids[1:], "attention_mask": torch.ones(len(ids) - 1, dtype=torch.long)}


def _task() -> object:
    from kronfluence.task import Task

    class SummedCrossEntropy(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: dict, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")

        def compute_measurement(self, batch: dict, model: torch.nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self) -> list[str]:
            return TARGETS

        def get_attention_mask(self, batch: dict) -> torch.Tensor:
            return batch["attention_mask"]

    return SummedCrossEntropy()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    out = tmp_path_factory.mktemp("kronfluence")
    model, task = tiny_llama().float(), _task()
    tracked = prepare_model(model, task)
    analyzer = Analyzer("tiny", tracked, task, output_dir=str(out), disable_model_save=True, cpu=True)
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own deprecations (torch.cuda.amp on CPU)
        analyzer.fit_all_factors("f", _Rows(), per_device_batch_size=2, factor_args=args, overwrite_output_dir=True)
    return tracked, out / "tiny" / "factors_f"  # Kronfluence's TrackedModules wrap the linears


def convert(model: torch.nn.Module, folder: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    from laplace_hub.bridges.kronfluence import to_artifact

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the EK-FAC warning; asserted in its own test
        return to_artifact(folder, model, base_model="me/tiny", batch_size=2, **kwargs)  # type: ignore[arg-type]


def test_the_artifact_holds_kronfluences_matrices_scaled_as_the_spec_says(fitted) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    model, folder = fitted
    artifact = convert(model, folder)
    assert validate_in_memory(artifact)
    tokens = sum(len(s) - 1 for s in SEQUENCES)
    activations, gradients = (
        load_file(folder / "activation_covariance.safetensors"),
        load_file(folder / "gradient_covariance.safetensors"),
    )
    info = artifact.manifest.datasets[0]
    assert (info.sequences, info.tokens, info.batches) == (4, tokens, 2)
    assert artifact.manifest.estimator.kind == "empirical" and artifact.manifest.kfac_approx == "expand"
    for name in TARGETS:
        block = artifact.block(name, dtype=torch.float64)
        expected = torch.kron(gradients[name].double() / 4, activations[name].double() / tokens)
        torch.testing.assert_close(block.dense(), expected, rtol=1e-6, atol=1e-9)


def test_it_equals_our_producer_on_the_same_sequences(fitted) -> None:  # type: ignore[no-untyped-def]
    from laplace_hub.data import pad_batch
    from laplace_hub.manifest import BaseModelInfo
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions, compute_artifact

    _, folder = fitted
    model = tiny_llama().float()  # the same weights, never prepared by Kronfluence
    batches = [pad_batch(SEQUENCES[:2], 0), pad_batch(SEQUENCES[2:], 0)]
    ours = compute_artifact(
        model, {"source": batches}, select_targets(model, "q_proj,v_proj"), ComputeOptions(), BaseModelInfo(repo_id="x")
    )
    for normalization in ("per_sequence", "per_token"):
        theirs = convert(model, folder, normalization=normalization)
        mine = (
            ours
            if normalization == "per_sequence"
            else compute_artifact(
                model,
                {"source": batches},
                select_targets(model, "q_proj,v_proj"),
                ComputeOptions(normalization="per_token"),
                BaseModelInfo(repo_id="x"),
            )
        )
        assert theirs.manifest.base_model.fingerprint == mine.manifest.base_model.fingerprint
        for name in TARGETS:
            torch.testing.assert_close(
                theirs.block(name, dtype=torch.float64).dense(),
                mine.block(name, dtype=torch.float64).dense(),
                rtol=1e-4,
                atol=1e-7,
            )


def validate_in_memory(artifact) -> bool:  # type: ignore[no-untyped-def]
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        artifact.save(Path(scratch) / "a")
        return validate(Path(scratch) / "a").valid


def test_ekfac_exports_its_kfac_covariances_with_a_warning(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from laplace_hub.bridges.kronfluence import to_artifact

    model, folder = fitted
    with pytest.warns(UserWarning, match="lambda_matrix"):
        to_artifact(folder, model, base_model="me/tiny", batch_size=2)
    covariances_only = shutil.copytree(folder, tmp_path / "factors", ignore=shutil.ignore_patterns("lambda_*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no corrected eigenvalues were fitted
        to_artifact(covariances_only, model, base_model="me/tiny", batch_size=2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: _settings(f, strategy="diagonal"), "strategy 'diagonal' has no Kronecker covariances"),
        (lambda f: _settings(f, amp_dtype="torch.bfloat16"), "amp_dtype"),
        (lambda f: _settings(f, covariance_data_partitions=2), "aggregate the partitions first"),
        (lambda f: (f / "gradient_covariance.safetensors").unlink(), "no gradient_covariance.safetensors"),
        (lambda f: (f / "factor_arguments.json").unlink(), "not a Kronfluence factor folder"),
        (lambda f: (f / "activation_covariance.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}"), "safetensors"),
        (lambda f: _dataset(f, indices=[0, 1]), "whole dataset"),
    ],
    ids=["strategy", "amp", "partitions", "missing-file", "no-settings", "corrupt", "indices"],
)
def test_what_cannot_be_converted_is_refused_by_name(fitted, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    model, folder = fitted
    copy = shutil.copytree(folder, tmp_path / "factors")
    edit(copy)
    with pytest.raises(LaplaceHubError, match=message):
        convert(model, copy)


def test_a_model_without_the_modules_is_refused(fitted) -> None:  # type: ignore[no-untyped-def]
    _, folder = fitted
    with pytest.raises(LaplaceHubError, match="is not a module of the model"):
        convert(torch.nn.Sequential(torch.nn.Linear(8, 8)), folder)


def _settings(folder: Path, **changes: object) -> None:
    path = folder / "factor_arguments.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _dataset(folder: Path, **changes: object) -> None:
    path = folder / "covariance_dataset_metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
