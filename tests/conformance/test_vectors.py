"""The validator and the CLI against every conformance vector; the schema against the models."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from laplace_hub.artifact import Artifact
from laplace_hub.manifest import SPEC_VERSION, STRUCTURES, Manifest, manifest_json_schema
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE, CONFORMANCE_ROOT, ROOT, run_cli

VERSIONS = sorted(p.name for p in CONFORMANCE_ROOT.iterdir() if p.is_dir())
VALID = sorted(p for v in VERSIONS for p in (CONFORMANCE_ROOT / v / "valid").iterdir() if p.is_dir())
INVALID = sorted(p for v in VERSIONS for p in (CONFORMANCE_ROOT / v / "invalid").iterdir() if p.is_dir())
SCHEMA_PATH = ROOT / "spec" / f"manifest-{SPEC_VERSION}.schema.json"


def _vector_id(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.name}"


def test_vectors_are_filed_under_their_spec_version() -> None:
    assert VERSIONS == ["1.0", SPEC_VERSION]
    for folder in VALID:
        version = json.loads((folder / "laplace.json").read_text())["spec_version"]
        assert version == folder.parent.parent.name or folder.name.startswith("newer-minor")


@pytest.mark.parametrize("folder", sorted((CONFORMANCE / "valid").iterdir()), ids=lambda p: p.name)
def test_golden_vectors_of_the_previous_minor_still_load(folder: Path) -> None:
    """Spec 1.0 artifacts, as a 1.0 writer wrote them, give every block to this reader."""
    artifact = Artifact.open(folder, verify_checksums=True)
    assert artifact.manifest.spec_version == "1.0"
    for name in artifact.manifest.modules:
        assert torch.isfinite(artifact.block(name, dtype=torch.float64).dense()).all()


def _same_json(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):  # eigen tails: last bits differ across BLAS builds
        return math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_the_generator_reproduces_every_committed_vector(tmp_path: Path) -> None:
    """Today's writer still writes the 1.0 goldens byte for byte (tensor files, checksums)."""
    subprocess.run([sys.executable, "spec/make_conformance.py", "--out", str(tmp_path)], cwd=ROOT, check=True)
    committed = sorted(p.relative_to(CONFORMANCE_ROOT) for p in CONFORMANCE_ROOT.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == committed
    for relative in committed:
        ours, theirs = (tmp_path / relative).read_bytes(), (CONFORMANCE_ROOT / relative).read_bytes()
        if ours != theirs:
            assert relative.suffix == ".json", relative
            assert _same_json(json.loads(ours), json.loads(theirs)), relative


def test_there_are_vectors_for_every_structure_and_parameterization() -> None:
    structures = set()
    for folder in VALID:
        manifest = json.loads((folder / "laplace.json").read_text())
        for module in manifest["modules"].values():
            structures |= {(manifest["parameterization"]["kind"], b["structure"]) for b in module["blocks"]}
    assert structures >= {
        ("weight", "diag"),
        ("weight", "kron"),
        ("weight", "kron_eig"),
        ("lora", "diag"),
        ("lora", "kron"),
        ("lora", "kron_tridiag"),
        ("weight", "diag_lowrank"),
        ("lora", "diag_lowrank"),
    }
    assert {s for _, s in structures} == set(STRUCTURES)


@pytest.mark.parametrize("folder", VALID, ids=_vector_id)
def test_valid_vector_is_accepted(folder: Path) -> None:
    report = validate(folder)
    assert report.valid, [f.line() for f in report.findings]


@pytest.mark.parametrize("folder", INVALID, ids=_vector_id)
def test_invalid_vector_gives_its_code(folder: Path) -> None:
    expected = json.loads(folder.with_name(f"{folder.name}.expected.json").read_text())["code"]
    report = validate(folder)
    assert not report.valid
    assert expected in {f.code for f in report.errors}, [f.line() for f in report.findings]


@pytest.mark.parametrize("folder", [VALID[0], *INVALID], ids=_vector_id)
def test_cli_json_agrees_and_exit_code(folder: Path) -> None:
    result = run_cli("validate", str(folder), "--json")
    data = json.loads(result.stdout)
    assert result.returncode == (0 if data["valid"] else 1)
    assert "Traceback" not in result.stderr
    if folder in INVALID:
        expected = json.loads(folder.with_name(f"{folder.name}.expected.json").read_text())["code"]
        assert expected in {f["code"] for f in data["findings"]}


def test_cli_on_garbage_gives_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "laplace.json").write_bytes(b"\xff\xfe\x00garbage")
    (garbage / "x.bin").write_bytes(b"\x00" * 64)
    for target in (junk, garbage):
        for command in ("validate", "inspect"):
            result = run_cli(command, str(target))
            assert result.returncode == 1
            assert "Traceback" not in result.stderr + result.stdout
    result = run_cli("inspect", str(junk))
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_usage_error_exits_2() -> None:
    assert run_cli("validate").returncode == 2
    assert run_cli("no-such-command").returncode == 2


def test_inspect_json_summarises() -> None:
    result = run_cli("inspect", str(CONFORMANCE / "valid" / "weight-kron-separate-mc"), "--json")
    summary = json.loads(result.stdout)
    assert [d["name"] for d in summary["datasets"]] == ["docs", "code"]
    assert summary["estimator"] == {"kind": "mc", "mc_samples": 2, "seed": 0}
    assert summary["total_bytes"] > 0


def test_checked_in_schema_is_not_stale() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == manifest_json_schema(), (
        "spec schema is stale: run `python spec/make_conformance.py --schema`"
    )


@pytest.mark.parametrize("folder", [v for v in VALID if not v.name.startswith("newer-minor")], ids=_vector_id)
def test_independent_json_schema_validator_accepts_valid_manifests(folder: Path) -> None:
    """Each vector fits its own version's schema and every later one (minors only add)."""
    manifest = json.loads((folder / "laplace.json").read_text())
    for version in VERSIONS:
        schema = json.loads((ROOT / "spec" / f"manifest-{version}.schema.json").read_text())
        if version >= manifest["spec_version"]:
            jsonschema.Draft202012Validator(schema).validate(manifest)


def test_the_previous_schema_rejects_the_new_features() -> None:
    schema = json.loads((ROOT / "spec" / "manifest-1.0.schema.json").read_text())
    for vector in ("weight-diag-lowrank", "merged-kron"):
        manifest = json.loads((CONFORMANCE_ROOT / "1.1" / "valid" / vector / "laplace.json").read_text())
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema).validate(manifest)


def test_json_schema_rejects_a_bad_manifest() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    manifest = json.loads((CONFORMANCE / "invalid" / "schema-error" / "laplace.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(manifest)


def test_spec_examples_match_the_models() -> None:
    text = (ROOT / "spec" / "SPEC.md").read_text()
    examples = re.findall(r"```json\n(.*?)```", text, re.S)
    assert examples, "SPEC.md has no JSON examples"
    for example in examples:
        data = json.loads(example)
        if "format" in data:
            Manifest.model_validate(data)
