"""An adapter records the prior it was trained under; ``inspect`` reads it back, strictly."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from laplace_hub.artifact import Artifact
from laplace_hub.cli import main
from laplace_hub.consumers import (
    PROVENANCE_FILE,
    LaplaceRegularizer,
    read_provenance,
    regularized_loss,
    save_adapter,
)
from laplace_hub.errors import ProvenanceError
from laplace_hub.hub import push
from laplace_hub.manifest import MANIFEST_NAME
from tests.conftest import save_tiny_artifact, tiny_llama

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama().float()


@pytest.fixture(scope="module")
def artifact_dir(base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_artifact(base, tmp_path_factory.mktemp("artifact") / "prior", TARGETS)


def peft(base, adapter: str = "default"):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(base), config, adapter_name=adapter)


def card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_save_adapter_records_the_artifact(base, artifact_dir: Path, tmp_path: Path) -> None:
    model = peft(base)
    reg = LaplaceRegularizer.from_artifact(Artifact.open(artifact_dir), model, strength=30.0, mode="lora_init")
    regularized_loss(model(input_ids=torch.tensor([[2, 3, 4]]), labels=torch.tensor([[2, 3, 4]])).loss, reg).backward()
    out = tmp_path / "adapter"
    save_adapter(model, out, reg)
    save_adapter(model, out, reg)  # a second save replaces the record, never adds one
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["provenance_version"] == 1 and record["prior"] == "artifact"
    penalty = (record["mode"], record["strength"], record["modules"], record["adapter"])
    assert penalty == ("lora_init", 30.0, 4, "default")
    artifact = record["artifact"]
    assert artifact["manifest_sha256"] == hashlib.sha256((artifact_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    assert artifact["path"] == artifact_dir.name and artifact["repo_id"] is None  # the name only: cards are published
    assert artifact["structures"] == ["kron"] and artifact["base_model"] == "me/tiny"
    metadata, body = card(out)
    assert metadata["library_name"] == "peft"  # PEFT's card is kept
    assert metadata["laplace_hub"] == record and "laplace-hub" in metadata["tags"]
    assert body.count("## Laplace prior") == 1 and "# Model Card" in body
    assert read_provenance(out) == read_provenance(out) is not None


def test_a_pulled_artifact_records_repo_and_revision(base, artifact_dir: Path, tmp_path: Path) -> None:
    push(artifact_dir, "me/prior", hub=tmp_path / "hub", create_repo=True)
    model = peft(base)
    reg = LaplaceRegularizer.from_pretrained("me/prior", model=model, strength=5.0, hub=tmp_path / "hub")
    save_adapter(model, tmp_path / "adapter", reg)
    record = read_provenance(tmp_path / "adapter")
    assert record is not None and record.artifact is not None
    assert record.artifact.repo_id == "me/prior" and record.artifact.path is None
    assert record.artifact.revision == record.artifact.manifest_sha256  # a local hub's revision: the manifest's sha256


def test_identity_and_named_adapters(base, tmp_path: Path) -> None:
    model = peft(base, adapter="task")
    reg = LaplaceRegularizer.identity(model, strength=2.0, adapter="task")
    save_adapter(model, tmp_path, reg)
    record = read_provenance(tmp_path / "task")  # PEFT saves a named adapter in its own folder
    assert record is not None and record.prior == "identity" and record.artifact is None and record.adapter == "task"


def test_inspect_prints_the_record(base, artifact_dir: Path, tmp_path: Path, capsys) -> None:
    model = peft(base)
    save_adapter(model, tmp_path, LaplaceRegularizer.from_artifact(Artifact.open(artifact_dir), model, strength=7.0))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256((artifact_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    assert "λ = 7, mode weight, 4 module(s)" in out and sha in out and artifact_dir.name in out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["artifact"]["manifest_sha256"] == sha


def test_an_adapter_without_provenance_says_so(base, tmp_path: Path, capsys) -> None:
    peft(base).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "none recorded" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"] is None


GOOD = {
    "provenance_version": 1,
    "laplace_hub_version": "0.1.0",
    "prior": "identity",
    "artifact": None,
    "mode": "weight",
    "strength": 1.0,
    "adapter": "default",
    "modules": 2,
}
HOSTILE = {
    "not json": b"{nope",
    "not an object": b"[]",
    "deep": b"[" * 5000 + b"]" * 5000,
    "huge": b'{"x": "' + b"a" * 70_000 + b'"}',
    "duplicate key": b'{"mode": "weight", "mode": "lora_init"}',
    "not utf-8": b'{"adapter": "\xff"}',
    "newer version": json.dumps({**GOOD, "provenance_version": 2}).encode(),
    "wrong type": json.dumps({**GOOD, "strength": "a lot"}).encode(),
    "negative strength": json.dumps({**GOOD, "strength": -1}).encode(),
    "unknown mode": json.dumps({**GOOD, "mode": "bogus"}).encode(),
    "terminal escape": json.dumps({**GOOD, "adapter": "x\x1b[2J\nfake line"}).encode(),
    "missing field": json.dumps({k: v for k, v in GOOD.items() if k != "mode"}).encode(),
    "bad sha": json.dumps(
        {
            **GOOD,
            "prior": "artifact",
            "artifact": {
                "manifest_sha256": "../../etc",
                "spec_version": "1.0",
                "structures": ["kron"],
                "parameterization": "weight",
                "normalization": "per_sequence",
                "base_model": "x",
            },
        }
    ).encode(),
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_hostile_provenance_is_one_line_error(content: bytes, json_flag: list[str], tmp_path: Path, capsys) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / PROVENANCE_FILE).write_bytes(content)
    assert main(["inspect", str(tmp_path), *json_flag]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "\x1b" not in err
    with pytest.raises(ProvenanceError):
        read_provenance(tmp_path)


def test_unknown_keys_of_a_later_minor_are_ignored(tmp_path: Path) -> None:
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({**GOOD, "added_later": {"x": 1}}))
    record = read_provenance(tmp_path)
    assert record is not None and record.strength == 1.0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs links and FIFOs")
@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_a_provenance_that_is_no_regular_file_is_refused(kind: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    target = tmp_path / PROVENANCE_FILE
    if kind == "symlink":
        (tmp_path / "elsewhere.json").write_text(json.dumps(GOOD))
        target.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_an_artifact_folder_with_any_name_is_recorded(base, artifact_dir: Path, tmp_path: Path, capsys) -> None:
    """A folder name is no manifest string, but it reaches the record too: control characters and all."""
    import shutil

    from laplace_hub.consumers.provenance import MAX_ORIGIN_LENGTH, _origin

    folder = tmp_path / ("prior\x1b[2J\n\u202e" + "x" * 200)
    shutil.copytree(artifact_dir, folder)
    model = peft(base)
    save_adapter(
        model, tmp_path / "adapter", LaplaceRegularizer.from_artifact(Artifact.open(folder), model, strength=1.0)
    )
    record = read_provenance(tmp_path / "adapter")
    assert record is not None and record.artifact is not None and record.artifact.path == folder.name  # kept exactly
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "prior\\x1b[2J\\n\\u202e" in out  # shown escaped
    # names from elsewhere (a pull's subfolder, a folder's undecodable bytes) are made Unicode and bounded
    assert _origin(os.fsdecode(b"a\xff")) == "a\\xff"
    assert _origin("y" * 1000) == "y" * (MAX_ORIGIN_LENGTH - 1) + "…"
