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


def test_every_knob_is_bisected_alike_in_its_own_direction() -> None:
    from laplace_hub.evaluation.experiment import bisection_points

    def entry(method: str, strength: float, em: float) -> dict:
        return {"method": method, "strength": strength, "val_target_em": em}

    cfg = SweepConfig(methods=("lora", "milora", "mtt", "flat_lora", "migu"))
    summary = [entry("lora", 0.0, 0.10), entry("milora", 0.0, 0.0)]
    summary += [entry("mtt", 0.1, 0.10), entry("mtt", 1.0, 0.05), entry("mtt", 10.0, 0.0)]
    summary += [entry("flat_lora", 0.01, 0.10), entry("flat_lora", 0.05, 0.10), entry("flat_lora", 0.1, 0.02)]
    # MIGU's t is the fraction that learns: the small t protects most
    summary += [entry("migu", 0.25, 0.05), entry("migu", 0.5, 0.099), entry("migu", 0.75, 0.10)]
    assert bisection_points(summary, cfg, tolerance=0.01) == {"mtt": 0.316, "flat_lora": 0.0707, "migu": 0.354}
    step = SweepConfig(methods=("mtt",), strengths=(0.316,), seeds=(0,), grids={})
    assert planned_runs(step) == [("mtt", 0.316, 0)]  # a bisection step runs its point, not the own grid


@pytest.mark.parametrize("method", ["lora_diag", "lora_kron", "lora_tridiag"])
def test_the_papers_forms_regularise_the_lora_weights_by_their_dense_precision(method: str) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from laplace_hub.consumers import adapted_modules
    from laplace_hub.evaluation.sweep import PAPER_FORMS, curvature_artifacts, regularizer_for

    base = tiny_llama()
    cfg = SweepConfig(methods=(method,), seeds=(0, 1), targets="q_proj,v_proj", lora_rank=2)
    artifacts = curvature_artifacts(base, data(), cfg)
    assert sorted(artifacts) == [f"{method}@0", f"{method}@1"]
    inits = []
    for seed in cfg.seeds:
        artifact = artifacts[f"{method}@{seed}"]
        assert artifact.manifest.parameterization.kind == "lora" and artifact.manifest.parameterization.rank == 2
        assert {b.structure for m in artifact.manifest.modules.values() for b in m.blocks} == {PAPER_FORMS[method]}
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base), config).double()
        reg = regularizer_for(method, 3.0, model, artifacts, cfg, seed)
        modules = list(adapted_modules(model))
        inits.append(modules[0].lora_a.detach().clone())
        gen = torch.Generator().manual_seed(seed)
        expected = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for m in modules:
                a0, b0 = (t.double() for t in artifact.lora_init(m.name))
                torch.testing.assert_close(m.lora_a.detach(), a0)  # the adapter starts at the artifact's init
                m.lora_a.add_(torch.randn(m.lora_a.shape, generator=gen, dtype=torch.float64))
                m.lora_b.add_(torch.randn(m.lora_b.shape, generator=gen, dtype=torch.float64))
                delta = torch.cat([(m.lora_a - a0).flatten(), (m.lora_b - b0).flatten()])
                expected += delta @ artifact.block(m.name, dtype=torch.float64).dense() @ delta
        torch.testing.assert_close(reg().double(), 0.5 * 3.0 * expected, rtol=1e-5, atol=1e-8)
    assert not torch.equal(inits[0], inits[1])  # each seed its own init, its own artifact


def test_at_peft_init_the_a_and_cross_blocks_vanish_so_tridiag_is_block_kfac() -> None:
    """B₀ = 0 makes every gradient in A zero at the init: B-TRI-K-FAC adds nothing to B-K-FAC there."""
    import torch

    from laplace_hub.evaluation.sweep import curvature_artifacts

    base = tiny_llama()
    cfg = SweepConfig(methods=("lora_kron", "lora_tridiag"), seeds=(0,), targets="q_proj", lora_rank=2)
    artifacts = curvature_artifacts(base, data(), cfg)
    for name in artifacts["lora_kron@0"].manifest.modules:
        kron, tridiag = (artifacts[f"{m}@0"].block(name, dtype=torch.float64).dense() for m in cfg.methods)
        size_a = 2 * artifacts["lora_kron@0"].manifest.modules[name].shape[1]
        assert torch.count_nonzero(tridiag[:size_a]) == 0 and torch.count_nonzero(tridiag[:, :size_a]) == 0
        assert torch.count_nonzero(tridiag[size_a:, size_a:]) > 0
        torch.testing.assert_close(kron, tridiag)


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


def test_a_methods_own_grid_is_replaced_by_grid_and_a_bad_one_refused_in_one_line(tmp_path: Path) -> None:
    from laplace_hub.cli.sweep_cmd import _grid
    from tests.conftest import run_cli

    assert _grid("mtt=0.01,0.03") == ("mtt", (0.01, 0.03))
    cfg = SweepConfig(methods=("mtt", "l2"), strengths=(0.1,), seeds=(0,), grids={"mtt": (0.01,)})
    assert planned_runs(cfg) == [("mtt", 0.01, 0), ("l2", 0.1, 0)]
    result = run_cli(
        "sweep",
        "smollm2",
        "--source",
        "x=stdlib:pydoc",
        "--target",
        "arithmetic",
        "--grid",
        "lora=1",
        "--out",
        str(tmp_path / "s"),
    )
    assert result.returncode == 1 and "--grid 'lora=1': expected METHOD=VALUES for one of mtt, flat_lora, migu" in (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
