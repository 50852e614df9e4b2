"""A λ sweep as one experiment on your own model and data: resumable, its results written to a folder.

Everything cheap is checked before the model loads (minutes): the grid, the artifacts given in
place of computed ones, the rows of an interrupted run, the target files, the source and the
probes' out-of-domain text. Rows go to ``runs.csv`` after every run, so that a resumed experiment
runs only what is missing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from laplace_hub.artifact import Artifact
from laplace_hub.data import Batch, DatasetSpec, check_source, load_texts, make_batches
from laplace_hub.errors import DataError, LaplaceHubError
from laplace_hub.evaluation.choice import Choice, choices_json, choose, summarize
from laplace_hub.evaluation.probes import python_license
from laplace_hub.evaluation.report import pareto_plot, read_rows, write_json, write_rows
from laplace_hub.evaluation.sweep import (
    ARTIFACT_FOR,
    LOOSER_AS_KNOB_GROWS,
    NO_KNOB,
    SourceSizes,
    SweepConfig,
    SweepData,
    curvature_artifacts,
    pending_runs,
    plan_line,
    run_sweep,
    sized_splits,
    with_probes,
)
from laplace_hub.evaluation.tasks import Example, read_examples, task_splits
from laplace_hub.models import load_model
from laplace_hub.progress import note

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

    ``curvature`` computes the artifacts from other data than the source's curvature split (which
    ``NAME=source`` names): e.g. ``self:N`` samples of the model for data-free curvature, or the
    split and ``self:N`` together (their sequences pooled). Each is cut to the split's size.
    ``bisect_steps`` > 0 refines λ per method after the grid: bisection (in log λ) between the
    largest grid strength whose validation target EM is within ``tolerance`` of plain LoRA's and
    the next one, ``bisect_steps`` times, so the choice lands near the largest λ that keeps learning.
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
    curvature: tuple[DatasetSpec, ...] = ()
    bisect_steps: int = 0
    task_sizes: tuple[int, int, int] = TASK_SIZES
    """Train, validation and test problems of a generated ``target`` task."""

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
    for spec in (experiment.source, *(c for c in experiment.curvature if not _is_split(c))):
        check_source(spec)
    if cfg.probes:
        python_license()  # the out-of-domain probe's source
    if (line := plan_line(cfg, done)) is not None:
        note(line)
    model, tokenizer = load_model(experiment.model, gguf_file=experiment.gguf_file)
    texts = load_texts(experiment.source, model, tokenizer, max_length=experiment.sizes.max_length)
    split, source_val, source_test = sized_splits(texts, tokenizer, experiment.sizes)
    curvature, curvature_texts = split, list(texts)
    if experiment.curvature:
        curvature, extra = curvature_data(experiment, model, tokenizer, split)
        curvature_texts += extra
    data = SweepData(targets["train"], targets["validation"], targets["test"], curvature, source_val, source_test)
    pending = {method for method, _, _ in pending_runs(cfg, done)}
    if experiment.bisect_steps or pending or not any(r["method"] == "base" for r in done):
        data = with_probes(data, model, tokenizer, cfg, curvature_texts)  # the base answers only when a row needs them
    wanted = cfg.methods if experiment.bisect_steps else [m for m in cfg.methods if m in pending]
    missing = dataclasses.replace(cfg, methods=tuple(m for m in wanted if m not in given))
    artifacts = {**curvature_artifacts(model, data, missing), **given}

    def sweep(grid: SweepConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run_sweep(model, tokenizer, data, grid, artifacts, rows, save=lambda r: write_rows(r, runs_csv))

    rows = sweep(cfg, done)
    for _ in range(experiment.bisect_steps):
        points = bisection_points(summarize(rows), cfg, experiment.tolerance)
        for method, strength in points.items():
            rows = sweep(dataclasses.replace(cfg, methods=(method,), strengths=(strength,), grids={}), rows)
    summary = summarize(rows)
    outcome = SweepOutcome(summary, choose(summary, experiment.priority, experiment.tolerance, experiment.budget))
    write_rows(rows, runs_csv)
    write_json(outcome.json(), summary_json)
    pareto_plot(summary, pareto_png, f"{experiment.model}: learning vs forgetting")
    return outcome


def _is_split(spec: DatasetSpec) -> bool:
    return str(spec.path) == "source"


def curvature_data(
    experiment: SweepExperiment, model: Any, tokenizer: Any, split: list[Batch]
) -> tuple[list[Batch], list[str]]:
    """The batches of ``experiment.curvature``, each dataset cut to the split's size; their texts."""
    sizes, batches, texts = experiment.sizes, [], []
    for spec in experiment.curvature:
        if _is_split(spec):
            batches += split
            continue
        found = load_texts(spec, model, tokenizer, max_length=sizes.max_length)
        texts += found
        batches += make_batches(
            found, tokenizer, max_length=sizes.max_length, batch_size=sizes.batch_size, num_batches=len(split)
        )
    return batches, texts


def bisection_points(summary: Sequence[Mapping[str, Any]], cfg: SweepConfig, tolerance: float) -> dict[str, float]:
    """Per method with a knob, the next value to try: the geometric middle of the bracket around the boundary.

    Every knob is tuned alike (λ, Mask-the-Target's KL weight, Flat-LoRA's ρ, MIGU's t): the
    bracket is the most protective value tried whose validation target EM is within ``tolerance``
    of plain LoRA's and the next more protective one tried; a bracket at the grid's end (every
    value matched, or none) has no point, and neither have methods without a knob.
    """
    lora = next((s for s in summary if s["method"] == "lora"), None)
    if lora is None:
        raise LaplaceHubError("bisection needs plain LoRA's runs: add lora to --methods", location="methods")
    points = {}
    for method in cfg.methods:
        if method in NO_KNOB:
            continue
        # from the least to the most protective value tried
        tried = sorted(
            ((s["strength"], s["val_target_em"]) for s in summary if s["method"] == method),
            reverse=method in LOOSER_AS_KNOB_GROWS,
        )
        matched = [i for i, (_, em) in enumerate(tried) if em >= lora["val_target_em"] - tolerance]
        if not matched or matched[-1] == len(tried) - 1:
            continue
        low, high = tried[matched[-1]][0], tried[matched[-1] + 1][0]
        points[method] = float(f"{math.sqrt(low * high):.3g}")
    return points


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
        return task_splits(experiment.target, *experiment.task_sizes)
    files = {"train": experiment.target_train, "validation": experiment.target_val, "test": experiment.target_test}
    missing = [split for split, path in files.items() if path is None]
    if missing:
        raise DataError(
            f"give `target` or all of `target_train`, `target_val`, `target_test` (missing: {', '.join(missing)})"
        )
    return {split: read_examples(path) for split, path in files.items() if path is not None}
