"""Sweeps: the grid, resuming an interrupted sweep, and the CSV round trip, on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from laplace_hub.data import pad_batch
from laplace_hub.evaluation.report import read_rows, write_rows
from laplace_hub.evaluation.sweep import SweepConfig, SweepData, pending_runs, planned_runs, run_sweep
from laplace_hub.evaluation.tasks import Example, task_splits
from tests.conftest import Words, tiny_llama

CFG = SweepConfig(
    methods=("lora", "l2", "mtt"), strengths=(1.0, 10.0), seeds=(0,), steps=1, batch_size=4, targets="q_proj"
)


def data() -> SweepData:
    examples = [Example(f"q {i}", f" a{i}") for i in range(8)]
    source = [pad_batch([[2, 3, 4, 5], [6, 7, 8]], 0)]
    return SweepData(examples, examples[:4], examples[4:], source, source, source)


def test_methods_with_their_own_knob_sweep_their_own_grid() -> None:
    assert planned_runs(CFG) == [
        ("lora", 0.0, 0),
        ("l2", 1.0, 0),
        ("l2", 10.0, 0),
        ("mtt", 0.1, 0),
        ("mtt", 1.0, 0),
        ("mtt", 10.0, 0),
    ]


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    model, words = tiny_llama().float(), Words()
    saves: list[int] = []

    def save(rows: list) -> None:
        saves.append(len(rows))
        write_rows(rows, tmp_path / "runs.csv")

    rows = run_sweep(model, words, data(), CFG, {}, save=save)
    assert saves == [2, 3, 4, 5, 6, 7]  # after every run
    assert read_rows(tmp_path / "runs.csv") == rows  # numbers come back as numbers, the base seed as None
    interrupted = rows[:3]  # base, lora, l2 λ=1
    assert pending_runs(CFG, interrupted) == planned_runs(CFG)[2:]
    resumed = run_sweep(model, words, data(), CFG, {}, done=interrupted)
    assert resumed[:3] == interrupted
    assert [(r["method"], r["strength"]) for r in resumed[3:]] == [(m, s) for m, s, _ in planned_runs(CFG)[2:]]
    assert pending_runs(CFG, resumed) == []


def test_generated_tasks_are_disjoint_and_reproducible() -> None:
    for task in ("arithmetic", "sorting"):
        splits = task_splits(task, 50, 20, 20, seed=3)
        prompts = [e.prompt for part in splits.values() for e in part]
        assert len(set(prompts)) == 90
        assert task_splits(task, 50, 20, 20, seed=3) == splits
    example = task_splits("sorting", 1, 0, 0)["train"][0]
    numbers = [int(n) for n in example.prompt.split(":")[2].split()[:-1]]
    assert example.completion == " " + " ".join(map(str, sorted(numbers)))


def test_resuming_from_a_file_that_is_not_a_runs_csv_is_a_one_line_error(tmp_path: Path) -> None:
    from laplace_hub.errors import DataError
    from tests.conftest import run_cli

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "runs.csv").write_text("method,strength,seed\nlora,not-a-number,0\n")
    with pytest.raises(DataError, match=r"not a runs\.csv"):
        read_rows(out / "runs.csv")
    (out / "runs.csv").write_text("a,b\n1,2\n")
    result = run_cli(
        "sweep", "smollm2", "--source", "x=stdlib:pydoc", "--target", "arithmetic", "--out", str(out), "--resume"
    )
    assert result.returncode == 1 and "not a runs.csv" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_per_example_scores_pool_to_the_metrics_and_survive_the_csv(tmp_path: Path) -> None:
    from laplace_hub.evaluation.metrics import Scores

    model, words = tiny_llama().float(), Words()
    rows = run_sweep(model, words, data(), CFG, {})
    for row in rows:
        for key in ("test_target_em", "test_source_nll", "test_source_accuracy"):
            scores = row[f"{key}_examples"]
            assert isinstance(scores, Scores) and scores.mean == pytest.approx(row[key], rel=1e-6)
        assert len(row["test_target_em_examples"].values) == 4  # one per test problem
        assert row["test_source_nll_examples"].weights == (3.0, 2.0)  # labelled next tokens per sequence
    write_rows(rows, tmp_path / "runs.csv")
    assert read_rows(tmp_path / "runs.csv") == rows  # exactly, per-example floats included


def test_bisection_brackets_the_largest_matched_strength() -> None:
    from laplace_hub.evaluation.experiment import bisection_points

    def entry(method: str, strength: float, em: float) -> dict:
        return {"method": method, "strength": strength, "val_target_em": em}

    cfg = SweepConfig(methods=("lora", "kron", "diag", "l2", "mtt"), strengths=(1.0, 10.0, 100.0))
    summary = [entry("lora", 0.0, 0.10), entry("mtt", 0.1, 0.0)]
    summary += [entry("kron", 1.0, 0.12), entry("kron", 10.0, 0.095), entry("kron", 100.0, 0.02)]
    summary += [entry("kron", 31.6, 0.05)]  # a first bisection step, not matched
    summary += [entry("diag", s, 0.2) for s in (1.0, 10.0, 100.0)]  # matched everywhere: no bracket
    summary += [entry("l2", s, 0.0) for s in (1.0, 10.0, 100.0)]  # matched nowhere: no bracket
    assert bisection_points(summary, cfg, tolerance=0.01) == {"kron": 17.8}  # √(10·31.6), 3 digits


def test_curvature_from_other_data_pools_the_split_with_each_dataset_cut_to_its_size(tmp_path: Path) -> None:
    from laplace_hub.data import DatasetSpec
    from laplace_hub.evaluation.experiment import SweepExperiment, curvature_data
    from laplace_hub.evaluation.sweep import SourceSizes

    texts = tmp_path / "other.txt"
    texts.write_text("\n\n".join(f"other text number {i} with words" for i in range(40)))
    sizes = SourceSizes(curvature_batches=2, eval_batches=1, batch_size=3, max_length=5)
    split = [pad_batch([[2, 3], [4, 5]], 0), pad_batch([[6, 7]], 0)]
    experiment = SweepExperiment(
        model="tiny",
        source=DatasetSpec.parse("pydoc=stdlib:pydoc"),
        out=tmp_path,
        sizes=sizes,
        curvature=(DatasetSpec.parse("pydoc=source"), DatasetSpec.parse(f"other={texts}")),
    )

    class Truncating(Words):
        def __call__(self, text: str, truncation: bool = False, max_length: int = 0) -> dict[str, list[int]]:
            return {"input_ids": super().__call__(text)["input_ids"][:max_length]}

    batches, extra = curvature_data(experiment, None, Truncating(), split)
    assert batches[0] is split[0] and batches[1] is split[1] and len(batches) == 4  # the split, then as many more
    assert all(b["input_ids"].shape == (3, 5) for b in batches[2:])  # batch size and max length of the split
    assert len(extra) == 40 and extra[0].startswith("other text")  # the probes avoid these texts too


def test_the_sweep_command_with_curvature_from_other_data_and_bisection(tmp_path: Path) -> None:
    import json

    from laplace_hub.cli import main
    from tests.conftest import lively_llama, tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny", [12] * 40, model=lively_llama())  # one that learns in 10 steps
    (folder / "other.txt").write_text(
        "\n\n".join(" ".join(f"t{(i * j) % 21 + 2}" for j in range(9)) for i in range(20))
    )
    for split in ("train", "val", "test"):
        records = [{"prompt": f"t{i % 21 + 2} t3", "completion": " t5"} for i in range(12)]  # learnable at once
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "sweep"
    argv = ["sweep", str(folder), "--source", f"s={folder / 'source.txt'}", "--no-probes", "-q", "--json"]
    argv += [f"--target-{split}={tmp_path / f'{split}.jsonl'}" for split in ("train", "val", "test")]
    argv += [
        "--methods",
        "lora,kron",
        "--strengths",
        "1,1000",
        "--seeds",
        "0,1",
        "--steps",
        "10",
        "--targets",
        "all-linear",
    ]
    argv += ["--lr", "0.05", "--lora-rank", "4"]
    argv += ["--curvature", "s=source", "--curvature", f"o={folder / 'other.txt'}", "--curvature-batches", "2"]
    argv += ["--eval-batches", "1", "--select", "budget", "--bisect-steps", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = read_rows(out / "runs.csv")
    tried = sorted({r["strength"] for r in rows if r["method"] == "kron"})
    summary = json.loads((out / "summary.json").read_text())["summary"]
    kron = [s for s in summary if s["method"] == "kron"]
    # LoRA learns the constant answer and λ = 1000 holds the weights where they were, so the grid
    # brackets LoRA's validation EM and one bisection step tries √1000 (to 3 digits)
    em = {s["strength"]: s["val_target_em"] for s in summary if s["method"] in ("kron", "lora")}
    assert em[1.0] >= em[0.0] - 0.01 > em[1000.0], em
    assert tried == [1.0, 31.6, 1000.0]
    assert all("test_source_nll_ci" in s and "test_target_em_ci" in s for s in summary)
    assert all("test_source_nll_vs_lora" in s for s in kron)
