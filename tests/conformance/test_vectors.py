"""The validator and the CLI against every conformance vector; the schema against the models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from laplace_hub.manifest import SPEC_VERSION, Manifest, manifest_json_schema
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE, ROOT, run_cli

VALID = sorted(p for p in (CONFORMANCE / "valid").iterdir() if p.is_dir())
INVALID = sorted(p for p in (CONFORMANCE / "invalid").iterdir() if p.is_dir())
SCHEMA_PATH = ROOT / "spec" / f"manifest-{SPEC_VERSION}.schema.json"


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
    }


@pytest.mark.parametrize("folder", VALID, ids=lambda p: p.name)
def test_valid_vector_is_accepted(folder: Path) -> None:
    report = validate(folder)
    assert report.valid, [f.line() for f in report.findings]


@pytest.mark.parametrize("folder", INVALID, ids=lambda p: p.name)
def test_invalid_vector_gives_its_code(folder: Path) -> None:
    expected = json.loads(folder.with_name(f"{folder.name}.expected.json").read_text())["code"]
    report = validate(folder)
    assert not report.valid
    assert expected in {f.code for f in report.errors}, [f.line() for f in report.findings]


@pytest.mark.parametrize("folder", [VALID[0], *INVALID], ids=lambda p: p.name)
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


@pytest.mark.parametrize("folder", VALID, ids=lambda p: p.name)
def test_independent_json_schema_validator_accepts_valid_manifests(folder: Path) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    manifest = json.loads((folder / "laplace.json").read_text())
    if folder.name.startswith("newer-minor"):
        pytest.skip("a newer minor may carry fields the 1.0 schema does not know (SPEC.md §10)")
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
