"""A λ sweep as one experiment on your own model and data: resumable, its results written to a folder.

Everything cheap is checked before the model loads (minutes): the grid, the artifacts given in
place of computed ones, the rows of an interrupted run, the target files, the source and the
probes' out-of-domain text. Rows go to ``runs.csv`` after every run, so that a resumed experiment
runs only what is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from laplace_hub.artifact import Artifact
from laplace_hub.data import DatasetSpec, check_source, load_texts
from laplace_hub.errors import DataError, LaplaceHubError
from laplace_hub.evaluation.choice import Choice, choices_json, choose, summarize
from laplace_hub.evaluation.probes import python_license
from laplace_hub.evaluation.report import pareto_plot, read_rows, write_json, write_rows
from laplace_hub.evaluation.sweep import (
    ARTIFACT_FOR,
    SourceSizes,
    SweepConfig,
    SweepData,
    curvature_artifacts,
    pending_runs,
    run_sweep,
    sized_splits,
    with_probes,
)
from laplace_hub.evaluation.tasks import Example, read_examples, task_splits
from laplace_hub.models import load_model

STRUCTURES = tuple(sorted(set(ARTIFACT_FOR.values())))
# train, validation and test examples of a generated target task
TASK_SIZES = (256, 100, 100)


@dataclass(frozen=True)
class SweepExperiment:
    """What to sweep, on what, and where the results go.

    The target is a generated ``target`` task or all three ``.jsonl`` files; ``artifacts`` maps a
    structure (``diag``, ``diag_lowrank``, ``kron``, ``kron_eig``) to an artifact folder used
    instead of computing it; ``resume`` keeps the rows already in ``out/runs.csv``. λ is chosen
    with ``priority``, ``tolerance`` and ``budget`` as :func:`~laplace_hub.evaluation.choose` says.
    """

    model: str
    source: DatasetSpec
    out: Path
    sweep: SweepConfig = field(default_factory=SweepConfig)
    sizes: SourceSizes = field(default_factory=SourceSizes)
    target: str | None = None
    target_train: Path | None = None
    target_val: Path | None = None
    target_test: Path | None = None
    artifacts: Mapping[str, Path] = field(default_factory=dict)
    gguf_file: str | None = None
    resume: bool = False
    priority: Literal["retention", "learning"] = "retention"
    tolerance: float = 0.01
    budget: float | None = None

    @property
    def files(self) -> tuple[Path, Path, Path]:
        """Where the rows, the summary with the choices, and the Pareto plot are written."""
        return self.out / "runs.csv", self.out / "summary.json", self.out / "pareto.png"


@dataclass(frozen=True)
class SweepOutcome:
    """Means over seeds per method and strength, and the strength chosen per method."""

    summary: list[dict[str, Any]]
    choices: list[Choice]

    def json(self) -> dict[str, Any]:
        """As JSON data (what ``summary.json`` holds)."""
        return {"summary": self.summary, "choices": choices_json(self.choices)}


def run_experiment(experiment: SweepExperiment) -> SweepOutcome:
    """Check, load, compute the missing artifacts, sweep, choose λ, and write the files.

    Raises:
        LaplaceHubError: An unknown method or artifact structure, or an artifact that fails to open.
        DataError: Target or source data missing or unreadable, a ``runs.csv`` that is not one, or
            (with ``sweep.probes``) no ``LICENSE.txt`` in this Python for the out-of-domain probe.

    """
    cfg = experiment.sweep
    cfg.check()
    given = open_artifacts(experiment.artifacts)
    runs_csv, summary_json, pareto_png = experiment.files
    done = read_rows(runs_csv) if experiment.resume and runs_csv.is_file() else []
    targets = target_examples(experiment)
    check_source(experiment.source)
    if cfg.probes:
        python_license()  # the out-of-domain probe's source
    model, tokenizer = load_model(experiment.model, gguf_file=experiment.gguf_file)
    texts = load_texts(experiment.source, model, tokenizer, max_length=experiment.sizes.max_length)
    curvature, source_val, source_test = sized_splits(texts, tokenizer, experiment.sizes)
    data = SweepData(targets["train"], targets["validation"], targets["test"], curvature, source_val, source_test)
    pending = {method for method, _, _ in pending_runs(cfg, done)}
    if pending or not any(r["method"] == "base" for r in done):  # the base answers only when a row needs them
        data = with_probes(data, model, tokenizer, cfg, texts)
    missing = dataclasses.replace(cfg, methods=tuple(m for m in cfg.methods if m in pending and m not in given))
    artifacts = {**curvature_artifacts(model, data, missing), **given}
    rows = run_sweep(model, tokenizer, data, cfg, artifacts, done, save=lambda r: write_rows(r, runs_csv))
    summary = summarize(rows)
    outcome = SweepOutcome(summary, choose(summary, experiment.priority, experiment.tolerance, experiment.budget))
    write_rows(rows, runs_csv)
    write_json(outcome.json(), summary_json)
    pareto_plot(summary, pareto_png, f"{experiment.model}: learning vs forgetting")
    return outcome


def open_artifacts(folders: Mapping[str, Path]) -> dict[str, Artifact]:
    """Open (verifying checksums) the artifacts given per structure, refusing a structure no method reads.

    Raises:
        LaplaceHubError: Located at ``artifacts``: a structure outside :data:`STRUCTURES`; or an
            artifact that does not open (its own error).

    """
    unknown = sorted(set(folders) - set(STRUCTURES))
    if unknown:
        raise LaplaceHubError(f"Invalid structure(s) {unknown}. Supported: {STRUCTURES}", location="artifacts")
    return {structure: Artifact.open(folder, verify_checksums=True) for structure, folder in folders.items()}


def target_examples(experiment: SweepExperiment) -> dict[str, list[Example]]:
    """Train, validation and test examples: of the generated task, or read from the three files.

    Raises:
        DataError: Neither a task nor all three files, or a file that is not prompt/completion records.

    """
    if experiment.target is not None:
        return task_splits(experiment.target, *TASK_SIZES)
    files = {"train": experiment.target_train, "validation": experiment.target_val, "test": experiment.target_test}
    missing = [split for split, path in files.items() if path is None]
    if missing:
        raise DataError(
            f"give `target` or all of `target_train`, `target_val`, `target_test` (missing: {', '.join(missing)})"
        )
    return {split: read_examples(path) for split, path in files.items() if path is not None}
