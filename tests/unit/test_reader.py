"""One rule runner for readers and the validator: same verdicts, hostile files refused unopened."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from laplace_hub.artifact import Artifact, merge, reader
from laplace_hub.artifact.files import sha256_file
from laplace_hub.errors import ArtifactError, LaplaceHubError
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE, CONFORMANCE_ROOT

VECTORS = sorted(p for p in CONFORMANCE_ROOT.glob("*/*/*") if p.is_dir())


@pytest.mark.parametrize("folder", VECTORS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_a_reader_refuses_exactly_what_the_validator_refuses(folder: Path) -> None:
    report = validate(folder)
    try:
        artifact = Artifact.open(folder, verify_checksums=True, check_values=True)
        for module in artifact.manifest.modules:
            artifact.block(module)
    except LaplaceHubError as e:
        assert not report.valid, e
        assert e.code in {f.code for f in report.errors}
    else:
        assert report.valid, report.errors


def _copy(tmp_path: Path, vector: str = "weight-kron") -> Path:
    folder = tmp_path / vector
    shutil.copytree(CONFORMANCE / "valid" / vector, folder)
    return folder


def _edit(folder: Path, edit: object) -> None:
    manifest = json.loads((folder / "laplace.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (folder / "laplace.json").write_text(json.dumps(manifest))


def test_a_linked_tensor_file_is_refused_unread(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "laplace.safetensors").rename(folder / ".data")
    (folder / "laplace.safetensors").symlink_to(".data")
    with pytest.raises(ArtifactError, match="symbolic link") as info:
        Artifact.open(folder)
    assert info.value.code == "file.not_regular"
    assert [f.code for f in validate(folder).errors] == ["file.not_regular"]


def test_a_fifo_never_blocks_the_reader(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "laplace.safetensors").unlink()
    os.mkfifo(folder / "laplace.safetensors")
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(validate(folder)), daemon=True)
    thread.start()
    thread.join(60)  # hang guard, far above the milliseconds this takes
    assert outcome, "validate blocked on a FIFO"
    assert [f.code for f in outcome[0].errors] == ["file.not_regular"]  # type: ignore[attr-defined]


def test_the_byte_budget_is_checked_before_anything_is_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _copy(tmp_path)
    with (folder / "laplace.safetensors").open("r+b") as f:
        f.truncate(3 * 2**30)  # sparse: no disk is used
    _edit(folder, lambda m: m["files"]["laplace.safetensors"].update(size=3 * 2**30))
    hashed: list[Path] = []
    monkeypatch.setattr("laplace_hub.artifact.rules_files.sha256_file", lambda p: hashed.append(p) or "0" * 64)
    report = validate(folder, max_bytes=2**30)
    assert [f.code for f in report.errors] == ["file.budget"] and not hashed
    with pytest.raises(ArtifactError, match="max_bytes"):
        Artifact.open(folder, max_bytes=2**30)


def test_block_checks_the_values_it_decodes(tmp_path: Path) -> None:
    """A reader that skipped the value check at open still never decodes an unsafe block."""
    folder = _copy(tmp_path, "weight-diag")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "laplace.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "laplace.safetensors", metadata={"format": "laplace-hub/1.0"})
    _edit(
        folder,
        lambda m: m["files"]["laplace.safetensors"].update(
            size=(folder / "laplace.safetensors").stat().st_size, sha256=sha256_file(folder / "laplace.safetensors")
        ),
    )
    artifact = Artifact.open(folder)  # headers only: accepted
    module = next(name for name, e in artifact.manifest.modules.items() if e.blocks[0].diagonal == key)  # type: ignore[union-attr]
    with pytest.raises(ArtifactError) as info:
        artifact.block(module)
    assert info.value.code == "value.non_finite"


def test_merging_an_artifact_with_itself_doubles_its_penalty_and_saves(tmp_path: Path) -> None:
    artifact = Artifact.open(CONFORMANCE / "valid" / "weight-kron")
    doubled = merge(artifact, artifact).save(tmp_path / "twice")
    delta = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.self_attn.q_proj"
    once = artifact.block(name, dtype=torch.float64).quad(delta.double())
    assert torch.allclose(doubled.block(name, dtype=torch.float64).quad(delta.double()), 2 * once, rtol=1e-9)


def test_merge_keeps_keys_and_dataset_names_within_the_spec(tmp_path: Path) -> None:
    """The longest key and dataset name the spec allows survive re-keying and de-duplication."""
    from laplace_hub.artifact import ArtifactBuilder, minimal_fields
    from laplace_hub.curvature import DiagBlock
    from laplace_hub.manifest import DatasetInfo

    long_module = "m" * 490  # its keys reach the 512-character limit
    name = "d" * 64
    builder = ArtifactBuilder()
    builder.add(long_module, (2, 3), DiagBlock(torch.ones(2, 3)))
    fields = minimal_fields(datasets=[DatasetInfo(name=name, sequences=2, tokens=4, batches=1)])
    single = builder.build(**fields).save(tmp_path / "a")
    merged = merge(single, single).save(tmp_path / "b")
    assert all(len(d.name) <= 64 for d in merged.manifest.datasets)
    assert len({d.name for d in merged.manifest.datasets}) == 2
    assert validate(tmp_path / "b").valid


def test_reading_runs_each_rule_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    original = reader.read
    monkeypatch.setattr(reader, "read", lambda folder, *a, **k: calls.append(folder) or original(folder, *a, **k))
    monkeypatch.setattr("laplace_hub.artifact.artifact.read", reader.read)
    Artifact.open(CONFORMANCE / "valid" / "weight-kron", verify_checksums=True)
    assert len(calls) == 1


def test_merging_a_posterior_whose_parts_share_keys_across_datasets_doubles_it(tmp_path: Path) -> None:
    """Dropping old part prefixes must not make ``0/x`` and ``1/x`` one key (found by the fuzzer)."""
    folder = tmp_path / "merged"
    shutil.copytree(CONFORMANCE_ROOT / "1.1" / "valid" / "merged-kron", folder)

    def swap(manifest: dict) -> None:  # k_proj's two datasets read each other's Σx (same shape: valid)
        first, second = manifest["modules"]["model.layers.0.self_attn.k_proj"]["blocks"]
        first["input"], second["input"] = second["input"], first["input"]

    _edit(folder, swap)
    artifact = Artifact.open(folder)
    doubled = merge(artifact, artifact).save(tmp_path / "twice")
    delta = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    name = "model.layers.0.self_attn.k_proj"
    once = artifact.block(name, dtype=torch.float64).quad(delta)
    assert torch.allclose(doubled.block(name, dtype=torch.float64).quad(delta), 2 * once, rtol=1e-9)


def test_a_tensor_file_replaced_after_the_checks_is_refused_not_read(tmp_path: Path) -> None:
    """A writer swapping the folder's file between open() and block() must not hand over its values."""
    folder = _copy(tmp_path)
    artifact = Artifact.open(folder)  # lazy: nothing mapped yet
    module = next(iter(artifact.manifest.modules))
    replacement = folder / "laplace.safetensors.new"
    shutil.copyfile(folder / "laplace.safetensors", replacement)
    replacement.replace(folder / "laplace.safetensors")  # same bytes, another file: still refused
    with pytest.raises(ArtifactError, match="changed on disk") as info:
        artifact.block(module)
    assert info.value.code == "file.changed"
    Artifact.open(folder).block(module)  # opened again, it reads


def test_a_verified_artifact_keeps_reading_the_bytes_it_hashed(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    artifact = Artifact.open(folder, verify_checksums=True)
    module = next(iter(artifact.manifest.modules))
    before = artifact.block(module, dtype=torch.float64).dense()
    other = _copy(tmp_path / "other")
    doubled = {k: v * 2 for k, v in load_file(other / "laplace.safetensors").items()}
    save_file(doubled, other / "laplace.safetensors", metadata={"format": "laplace-hub/1.0"})
    (other / "laplace.safetensors").replace(folder / "laplace.safetensors")  # a writer replaces the file
    assert torch.equal(artifact.block(module, dtype=torch.float64).dense(), before)


def test_a_linked_model_card_is_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "README.md").symlink_to("/etc/hostname")
    assert [f.code for f in validate(folder).errors] == ["file.not_regular"]
    with pytest.raises(ArtifactError, match="symbolic link"):
        Artifact.open(folder)
