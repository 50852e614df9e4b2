"""The end-to-end story on a real model: publish curvature, pull it, fine-tune with and without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laplace_hub.data import Batch
from laplace_hub.errors import ArtifactError
from laplace_hub.evaluation.choice import choices_json, choose, summarize
from laplace_hub.evaluation.report import pareto_plot, table, write_json, write_rows
from laplace_hub.evaluation.sweep import SourceSizes, SweepConfig, SweepData, pydoc_splits, run_sweep, with_probes
from laplace_hub.evaluation.tasks import task_splits
from laplace_hub.hub import pull, push
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import SMOLLM2_REPO_ID, load_model, select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.progress import note
from laplace_hub.validate import validate


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so that ``scripts/demo.sh`` (install included) finishes within 12 minutes on 2 CPU cores.

    One fine-tuning run takes about a minute there, so the demo runs six: plain LoRA and K-FAC
    LaLoRA at two strengths, two seeds. The full grid lives in ``laplace-hub sweep``.
    """

    out: Path = Path("out/demo")
    source: SourceSizes = field(default_factory=SourceSizes)
    n_train: int = 256
    n_val: int = 100
    n_test: int = 100
    sweep: SweepConfig = field(
        default_factory=lambda: SweepConfig(methods=("lora", "kron"), strengths=(3.0, 10.0), seeds=(0, 1))
    )
    seed: int = 0


def publish(model: Any, curvature: list[Batch], cfg: DemoConfig) -> str:
    """The publisher: K-FAC on the target modules, validated, pushed into the model's repo on a local hub."""
    artifact = compute_artifact(
        model,
        {"pydoc": curvature},
        select_targets(model, cfg.sweep.targets),
        ComputeOptions(structure="kron"),
        BaseModelInfo(repo_id=SMOLLM2_REPO_ID),
        sources={"pydoc": "stdlib:pydoc (first 3/4 of the topics)"},
    )
    folder = cfg.out / "artifact"
    artifact.save(folder, overwrite=True)
    report = validate(folder)
    if not report.valid:
        raise ArtifactError(f"the demo's own artifact is invalid: {report.errors[0].line()}")
    return push(folder, SMOLLM2_REPO_ID, hub=cfg.out / "hub", path_in_repo="laplace", create_repo=True).commit_url


def say(line: str) -> None:
    """A progress line, on stderr: stdout is for the report (and ``--json``); none with ``--quiet``."""
    note(line)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Publisher → local hub → fine-tuner sweep; λ chosen on validation, reported on test."""
    model, tokenizer = load_model("smollm2")
    curvature, source_val, source_test = pydoc_splits(tokenizer, cfg.source, seed=cfg.seed)
    say(f"[publisher] K-FAC on {cfg.sweep.targets} of all layers, {len(curvature)} batches of pydoc text")
    url = publish(model, curvature, cfg)
    say(f"[publisher] validated and pushed to the local hub: {url}")
    pulled = pull(SMOLLM2_REPO_ID, subfolder="laplace", hub=cfg.out / "hub", local_dir=cfg.out / "pulled")
    say(
        f"[fine-tuner] pulled {SMOLLM2_REPO_ID} --subfolder laplace (checksums verified): "
        f"{len(pulled.manifest.modules)} modules"
    )
    splits = task_splits("arithmetic", cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed)
    data = SweepData(splits["train"], splits["validation"], splits["test"], curvature, source_val, source_test)
    if cfg.sweep.probes:
        say("[fine-tuner] forgetting probes: near/out-of-domain text, the base model's chat answers, skills")
    data = with_probes(data, model, tokenizer, cfg.sweep)
    rows = run_sweep(model, tokenizer, data, cfg.sweep, {"kron": pulled})
    summary = summarize(rows)
    choices = choose(summary, "retention")
    write_rows(rows, cfg.out / "runs.csv")
    pareto_plot(summary, cfg.out / "pareto.png", "SmolLM2-135M: LoRA vs weight-space LaLoRA (K-FAC)")
    result = {"summary": summary, "choices": choices_json(choices), "artifact": url}
    write_json(result, cfg.out / "demo.json")
    return result


def format_report(result: dict[str, Any], out: Path) -> str:
    """The table, the choices and where the files are."""
    lines = [table(result["summary"]), ""]
    lines += [f"{c['method']}: {c['verdict']}" for c in result["choices"]]
    lines += ["", f"files: {out / 'runs.csv'}, {out / 'demo.json'}, {out / 'pareto.png'}"]
    return "\n".join(lines)
