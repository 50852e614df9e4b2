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
from laplace_hub.cli import main
from laplace_hub.manifest import SPEC_VERSION, STRUCTURES, Manifest, manifest_json_schema
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE, CONFORMANCE_ROOT, ROOT, SUPERSEDED, run_cli

VERSIONS = sorted(p.name for p in CONFORMANCE_ROOT.iterdir() if p.is_dir())
SCHEMA_PATH = ROOT / "spec" / f"manifest-{SPEC_VERSION}.schema.json"

# Codes no vector in git can trigger: a base model to compare with (model.*), an OS error on a
# read (file.unreadable: tests run as root, whom permissions do not stop), a file replaced while it is
# read (file.changed: tests/unit/test_reader.py). See make_conformance.py.
NO_VECTOR = {"model.module_missing", "model.shape", "file.unreadable", "file.changed"}
# The codes spec 1.2 adds or gives new rules, and the codes no 1.0/1.1 vector gave: each needs a vector
# even before SPEC.md §9 lists it.
CODES_1_2 = {
    "manifest.fingerprint",
    "file.not_regular",
    "file.budget",
    "file.bad_safetensors",
    "file.metadata",
    "manifest.json_invalid",
    "manifest.schema",
    "manifest.datasets",
    "value.range",
    "value.eigen_order",
    "value.not_orthonormal",
    "value.not_psd",
    "index.inconsistent",
    "artifact.not_found",
    "manifest.estimator",
    "manifest.kfac_approx",
    "manifest.param",
    "manifest.tensor_conflict",
    "file.missing",
    "file.size",
    "index.missing",
    "index.invalid",
}
# 1.2 vectors whose code this validator reports together with others (a validator bug, not the
# vector's: each breaks one rule). Remove an entry once the validator reports that code alone.


def _vector_id(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.name}"


def _vectors(kind: str, version: str | None = None) -> list[Path]:
    """The vectors of ``kind``: folders, or (artifact.not_found) a file standing where one should be."""
    return sorted(
        p
        for v in ([version] if version else VERSIONS)
        for p in (CONFORMANCE_ROOT / v / kind).iterdir()
        if not p.name.endswith(".expected.json") and p.relative_to(CONFORMANCE_ROOT).as_posix() not in SUPERSEDED
    )


def _expected(folder: Path) -> str:
    code: str = json.loads(folder.with_name(f"{folder.name}.expected.json").read_text())["code"]
    return code


VALID = _vectors("valid")
INVALID = _vectors("invalid")
INVALID_1_2 = _vectors("invalid", "1.2")
INVALID_1_3 = _vectors("invalid", "1.3")
PENALTIES = json.loads((CONFORMANCE_ROOT / f"penalties-{SPEC_VERSION}.json").read_text())


def test_vectors_are_filed_under_their_spec_version() -> None:
    assert VERSIONS == ["1.0", "1.1", "1.2", "1.3"]
    assert VERSIONS[-1] == SPEC_VERSION
    assert all(p.is_dir() for p in VALID)
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
    """Today's writer still writes the 1.0 and 1.1 goldens byte for byte (tensor files, checksums)."""
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
    expected = _expected(folder)
    report = validate(folder)
    assert not report.valid
    assert expected in {f.code for f in report.errors}, [f.line() for f in report.findings]


@pytest.mark.parametrize("folder", INVALID_1_2 + INVALID_1_3, ids=_vector_id)
def test_1_2_and_1_3_invalid_vector_gives_its_code_only(folder: Path) -> None:
    """Each 1.2 and 1.3 vector breaks one rule: every error is of its code (nothing cascades from it)."""
    report = validate(folder)
    assert report.errors, [f.line() for f in report.findings]
    expected = json.loads(folder.with_name(f"{folder.name}.expected.json").read_text())
    codes = {f.code for f in report.errors}
    assert expected["code"] in codes and codes <= {expected["code"], *expected.get("follow_ons", [])}, [
        f.line() for f in report.findings
    ]


def test_1_2_invalid_vectors_keep_their_old_spec_version() -> None:
    """A 1.0 or 1.1 artifact that breaks a 1.2 rule: the point is that old artifacts are held to it."""
    for folder in INVALID_1_2:
        manifest = folder / "laplace.json" if folder.is_dir() else folder
        if manifest.exists() and not folder.name.startswith("unknown-structure-newer-minor"):
            version = re.search(rb'"spec_version": "([0-9.]+)"', manifest.read_bytes())
            assert version is not None and version[1] in (b"1.0", b"1.1"), folder


def test_every_valid_vector_has_expected_penalties() -> None:
    assert sorted(PENALTIES) == sorted(
        p.relative_to(CONFORMANCE_ROOT).as_posix() for p in VALID if not p.name.startswith("newer-minor")
    )


@pytest.mark.parametrize("vector", sorted(PENALTIES))
def test_the_reader_returns_the_expected_penalties(vector: str) -> None:
    """SPEC.md §8.3's fidelity: the penalty is the dense form of the stored numbers (computed by the generator
    from the raw safetensors, without this package's reader), in float64 to rounding, in float32 to 1e-5."""
    artifact = Artifact.open(CONFORMANCE_ROOT / vector, verify_checksums=True)
    for module, cases in PENALTIES[vector].items():
        for case in cases:
            deltas = [torch.tensor(d, dtype=torch.float64) for d in case["deltas"]]
            wide = artifact.block(module, dtype=torch.float64).quad(*deltas).item()
            narrow = artifact.block(module).quad(*(d.float() for d in deltas)).item()
            assert wide == pytest.approx(case["penalty"], rel=1e-9, abs=1e-12), (module, case)
            assert narrow == pytest.approx(case["penalty"], rel=1e-5, abs=1e-9), (module, case)


@pytest.mark.parametrize("vector", sorted(SUPERSEDED))
def test_superseded_vectors_get_a_1_2_readers_verdict(vector: str) -> None:
    report = validate(CONFORMANCE_ROOT / vector)
    assert not report.valid
    assert {f.code for f in report.errors} == {SUPERSEDED[vector]}, [f.line() for f in report.findings]


def _spec_codes() -> set[str]:
    """The backticked codes in the first column of SPEC.md §9's table."""
    text = (ROOT / "spec" / "SPEC.md").read_text()
    section = re.search(r"^## 9\. .*?$(.*?)^## ", text, re.S | re.M)
    assert section, "SPEC.md has no §9"
    rows = [line.split("|")[1] for line in section[1].splitlines() if line.startswith("| `")]
    return {code for cell in rows for code in re.findall(r"`([a-z_]+\.[a-z_]+)`", cell)}


def test_every_finding_code_has_an_invalid_vector() -> None:
    spec = _spec_codes()
    assert len(spec) >= 30, sorted(spec)
    covered = {_expected(p) for p in INVALID}
    assert not NO_VECTOR & covered, "a code listed as having no vector has one: drop it from NO_VECTOR"
    assert sorted((spec | CODES_1_2) - NO_VECTOR - covered) == []


@pytest.mark.parametrize("folder", [VALID[0], *INVALID], ids=_vector_id)
def test_cli_json_agrees_and_exit_code(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In process (a child process per vector costs a torch import each); the tests below run the real command."""
    code = main(["validate", str(folder), "--json"])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert code == (0 if data["valid"] else 1)
    assert "Traceback" not in err
    if folder in INVALID:
        assert _expected(folder) in {f["code"] for f in data["findings"]}


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
    assert summary["total_bytes"] == sum(summary["files"].values()) > summary["tensor_bytes"] > 0


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
