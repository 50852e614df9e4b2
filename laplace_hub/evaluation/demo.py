"""The end-to-end story on a real model: publish curvature, pull it, fine-tune with and without it."""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from laplace_hub.artifact import Artifact
from laplace_hub.consumers import LaplaceRegularizer, regularized_loss
from laplace_hub.data import make_batches, pydoc_texts
from laplace_hub.evaluation.metrics import exact_match, problem_batch, source_metrics
from laplace_hub.evaluation.tasks import make_splits
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import SMOLLM2_REPO_ID, load_model, select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.validate import validate


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen to finish within minutes on 2 CPU cores."""

    out: Path = Path("out/demo")
    targets: str = "q_proj,v_proj"
    curvature_batches: int = 8
    eval_batches: int = 4
    batch_size: int = 4
    max_length: int = 64
    train_problems: int = 96
    test_problems: int = 48
    steps: int = 40
    lora_rank: int = 8
    lr: float = 2e-3
    strengths: tuple[float, ...] = (0.0, 1e3)
    seed: int = 0


def _train(
    model: Any, tokenizer: Any, reg: LaplaceRegularizer | None, train: list, cfg: DemoConfig, label: str
) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(cfg.steps), desc=f"fine-tune [{label}]", unit="step", leave=False):
        batch = problem_batch(rng.sample(train, 8), tokenizer, tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad()
        regularized_loss(loss, reg).backward()
        opt.step()
    model.eval()
    return time.perf_counter() - start


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Publisher → local hub → fine-tuner, with and without the regularizer; returns the report."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model("smollm2")
    texts = pydoc_texts()
    split = len(texts) * 3 // 4
    curv = make_batches(
        texts[:split],
        tokenizer,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        num_batches=cfg.curvature_batches,
        seed=cfg.seed,
    )
    held_out = make_batches(
        texts[split:],
        tokenizer,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        num_batches=cfg.eval_batches,
        seed=cfg.seed,
    )
    print(f"[publisher] K-FAC on {cfg.targets} over {len(curv)} batches of pydoc text")
    artifact = compute_artifact(
        model,
        {"pydoc": curv},
        select_targets(model, cfg.targets),
        ComputeOptions(structure="kron"),
        BaseModelInfo(repo_id=SMOLLM2_REPO_ID),
    )
    published = cfg.out / "hub" / SMOLLM2_REPO_ID.replace("/", "--") / "laplace"
    artifact.save(published, overwrite=True)
    report = validate(published)
    print(f"[publisher] published to {published} ({'valid' if report.valid else 'INVALID'})")
    pulled = Artifact.open(published, verify_checksums=True)
    splits = make_splits(cfg.train_problems, 0, cfg.test_problems, seed=cfg.seed)
    test = problem_batch(splits["test"], tokenizer, tokenizer.pad_token_id)
    rows = [
        {
            "run": "base model",
            "strength": None,
            **source_metrics(model, held_out),
            "target_exact_match": exact_match(model, test),
            "seconds": 0.0,
        }
    ]
    for strength in cfg.strengths:
        torch.manual_seed(cfg.seed)
        lora = get_peft_model(
            copy.deepcopy(model),
            LoraConfig(
                r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=cfg.targets.split(","), lora_dropout=0.0
            ),
        )
        reg = LaplaceRegularizer.from_artifact(pulled, lora, strength=strength) if strength else None
        seconds = _train(lora, tokenizer, reg, splits["train"], cfg, f"λ={strength:g}")
        rows.append(
            {
                "run": "LoRA" if not strength else "LaLoRA (weight-space K-FAC)",
                "strength": strength,
                **source_metrics(lora, held_out),
                "target_exact_match": exact_match(lora, test),
                "seconds": round(seconds, 1),
            }
        )
    result = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "rows": rows}
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report as a terminal table."""
    lines = [f"{'run':<30} {'λ':>8} {'source NLL':>11} {'source acc':>11} {'target EM':>10} {'train s':>8}"]
    for r in rows:
        strength = "-" if r["strength"] is None else f"{r['strength']:g}"
        lines.append(
            f"{r['run']:<30} {strength:>8} {r['source_nll']:>11.4f} {r['source_accuracy']:>11.4f} "
            f"{r['target_exact_match']:>10.3f} {r['seconds']:>8}"
        )
    return "\n".join(lines)
