"""Artifact on disk → PEFT model → transformers Trainer / TRL SFTTrainer with the penalty in the loss."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerFast, TrainingArguments

from laplace_hub.artifact import Artifact
from laplace_hub.cli import main
from laplace_hub.consumers import (
    PROVENANCE_FILE,
    LaplaceRegularizer,
    adapted_modules,
    laplace_sft_trainer_class,
    laplace_trainer_class,
)
from laplace_hub.data import pad_batch
from laplace_hub.manifest import MANIFEST_NAME, BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from tests.conftest import tiny_llama

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama().float()


@pytest.fixture(scope="module")
def artifact_dir(base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = torch.Generator().manual_seed(5)
    source = [pad_batch([torch.randint(2, 23, (8,), generator=gen).tolist() for _ in range(4)], 0) for _ in range(4)]
    artifact = compute_artifact(
        base, {"src": source}, select_targets(base, TARGETS), ComputeOptions(), BaseModelInfo(repo_id="tiny")
    )
    folder = tmp_path_factory.mktemp("artifact") / "a"
    artifact.save(folder)
    return folder


class Examples(torch.utils.data.Dataset):
    """A target task: fixed sequences the tiny model must learn."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(9)
        self.rows = [torch.randint(2, 23, (6,), generator=gen) for _ in range(8)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def peft(base):
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(base), config)


def args(tmp_path: Path, **kw) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=25,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def curvature_share(model, artifact: Artifact) -> tuple[float, float]:
    """ΔᵀPΔ and ΔᵀPΔ / |Δ|² of the learned updates: how much they lie in sharp directions."""
    quad, norm = 0.0, 0.0
    for m in adapted_modules(model):
        block = artifact.block(m.name)
        b, a = m.scaling * m.lora_b.detach(), m.lora_a.detach()
        quad += float(block.quad_lowrank(b, a))
        norm += float((b @ a).square().sum())
    return quad, quad / norm


def test_trainer_with_regularizer_moves_less_in_sharp_directions(base, artifact_dir: Path, tmp_path: Path) -> None:
    artifact = Artifact.open(artifact_dir, verify_checksums=True)
    trainer_class = laplace_trainer_class()
    shares = {}
    for strength in (0.0, 50.0):
        model = peft(base)
        reg = LaplaceRegularizer.from_artifact(artifact, model, strength=strength) if strength else None
        trainer = trainer_class(
            model=model, args=args(tmp_path / str(strength)), train_dataset=Examples(), regularizer=reg
        )
        result = trainer.train()
        assert result.training_loss > 0
        if reg is not None:
            logged = [h for h in trainer.state.log_history if "laplace_penalty" in h]
            assert logged and logged[0]["laplace_strength"] == 50.0
        shares[strength] = curvature_share(model, artifact)
    assert shares[50.0][0] < 0.5 * shares[0.0][0]
    assert shares[50.0][1] < shares[0.0][1]  # not only smaller: turned away from sharp directions


def test_checkpoint_saves_and_restores_the_lora_init_anchor(base, artifact_dir: Path, tmp_path: Path) -> None:
    artifact = Artifact.open(artifact_dir)
    model = peft(base)
    reg = LaplaceRegularizer.from_artifact(artifact, model, strength=10.0, mode="lora_init")
    anchors = {k: v.clone() for k, v in reg.state_dict().items()}
    trainer = laplace_trainer_class()(
        model=model,
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=Examples(),
        regularizer=reg,
    )
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "laplace_regularizer.safetensors").is_file()
    # resume in a fresh process: the model has moved, so a new regularizer anchors wrongly until restored
    resumed_model = peft(base)
    with torch.no_grad():
        for m in adapted_modules(resumed_model):
            m.lora_b.add_(1.0)
    fresh = LaplaceRegularizer.from_artifact(artifact, resumed_model, strength=1.0, mode="lora_init")
    resumed = laplace_trainer_class()(
        model=resumed_model,
        args=args(tmp_path, max_steps=6, save_strategy="no"),
        train_dataset=Examples(),
        regularizer=fresh,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for key, value in anchors.items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    assert fresh.strength == 10.0


def test_trainer_saves_the_prior_beside_the_adapter(base, artifact_dir: Path, tmp_path: Path, capsys) -> None:
    model = peft(base)
    reg = LaplaceRegularizer.from_artifact(Artifact.open(artifact_dir), model, strength=25.0)
    trainer = laplace_trainer_class()(
        model=model,
        args=args(tmp_path / "run", max_steps=2, gradient_accumulation_steps=1, save_strategy="steps", save_steps=2),
        train_dataset=Examples(),
        regularizer=reg,
    )
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    sha = hashlib.sha256((artifact_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    for folder in (out, tmp_path / "run" / "checkpoint-2"):  # the final save and every checkpoint
        assert (folder / "adapter_config.json").is_file()
        record = json.loads((folder / PROVENANCE_FILE).read_text())
        assert (record["mode"], record["strength"], record["artifact"]["manifest_sha256"]) == ("weight", 25.0, sha)
        metadata = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
        assert metadata["library_name"] == "peft" and metadata["laplace_hub"] == record
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "λ = 25, mode weight" in shown and f"sha256 {sha}" in shown
    (out / PROVENANCE_FILE).write_text('{"provenance_version": 1, "mode": ')  # corrupted
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and PROVENANCE_FILE in err and len(err.strip().splitlines()) == 1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 23)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer_adds_the_penalty(base, artifact_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    artifact = Artifact.open(artifact_dir)
    model = peft(base)
    reg = LaplaceRegularizer.from_artifact(artifact, model, strength=50.0)
    data = Dataset.from_list([{"text": " ".join(f"t{int(i)}" for i in row)} for row in Examples().rows])
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
    )
    trainer = laplace_sft_trainer_class()(
        model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer(), regularizer=reg
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "laplace_penalty" in h]
    assert logged and logged[-1]["laplace_penalty"] > 0
