"""Forgetting probes: their texts avoid the curvature's, their scores mean what they say, sweeps report them."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from laplace_hub.errors import DataError
from laplace_hub.evaluation.choice import choices_json, choose, summarize
from laplace_hub.evaluation.metrics import exact_match
from laplace_hub.evaluation.probes import (
    PROBE_METRICS,
    PROMPTS,
    Probes,
    ProbeSizes,
    behaviour_batches,
    build_probes,
    disjoint,
    near_domain_texts,
    out_of_domain_texts,
    probe_metrics,
    python_license,
)
from laplace_hub.evaluation.report import pareto_plot, read_rows, table, write_json, write_rows
from laplace_hub.evaluation.sweep import SweepConfig, run_sweep, with_probes
from laplace_hub.evaluation.tasks import SKILLS, TASKS, skill_examples
from tests.conftest import Words, lively_llama
from tests.unit.test_sweep import data

SIZES = ProbeSizes(texts=4, max_length=12, behaviour_prompts=8, answer_tokens=6, skill_questions=4, batch_size=4)


@pytest.fixture(scope="module")
def probed() -> tuple[torch.nn.Module, Probes]:
    model = lively_llama()
    return model, build_probes(model, Words(), SIZES)


def _grams(text: str) -> set[tuple[str, ...]]:  # the brute-force reference: 8 lower-cased words in a row
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + 8]) for i in range(len(words) - 7)}


def test_probe_texts_share_no_paragraph_and_no_8_words_with_the_curvature_texts() -> None:
    from pydoc_data.topics import topics

    curvature = list(topics.values())
    paragraphs = {" ".join(p.split()) for text in curvature for p in re.split(r"\n\s*\n", text)}
    grams = set().union(*map(_grams, curvature))
    near, ood = near_domain_texts(), out_of_domain_texts()
    assert len(near) >= 100 and len(ood) >= 16  # enough for several batches of each
    for text in near + ood:
        assert text not in paragraphs and not _grams(text) & grams, text
    assert not set(near) & set(ood)
    # prose: no code, no doctest, whole sentences
    assert all(">>>" not in t and "{" not in t and "=" not in t and t.endswith(".") for t in near + ood)
    # the caller's own curvature texts are avoided too
    assert disjoint(near[:3], [f"Intro.\n\n{near[1]}"]) == [near[0], near[2]]
    eight = " ".join(near[0].split()[:8])
    assert disjoint(near[:1], [f"nothing else but {eight} here"]) == []


def test_the_out_of_domain_source_is_cpythons_licence_and_its_absence_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "Python Software Foundation" in python_license().read_text()
    import os

    monkeypatch.setattr(os, "__file__", str(tmp_path / "lib" / "os.py"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
    with pytest.raises(DataError, match=r"LICENSE\.txt.*--no-probes"):
        python_license()


def test_the_behaviour_probe_scores_the_base_models_own_answers_best(probed: tuple[torch.nn.Module, Probes]) -> None:
    model, probes = probed
    assert len(probes.answers) == len(PROMPTS[: SIZES.behaviour_prompts])
    assert all(1 <= len(a) <= SIZES.answer_tokens for a in probes.answers)
    assert len({tuple(a) for a in probes.answers}) > 1  # answers depend on the prompt
    own = probe_metrics(model, probes)["behaviour_nll"]
    # every answer token is the base model's argmax after its own prefix
    for batch in probes.behaviour:
        with torch.no_grad():
            predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        labelled = batch["labels"][:, 1:] != -100
        assert torch.equal(predicted[:, :-1][labelled], batch["labels"][:, 1:][labelled])
    # another prompt's answers score worse
    shifted = probes.answers[1:] + probes.answers[:1]
    shuffled = dataclasses.replace(probes, behaviour=behaviour_batches(probes.prompts, shifted, 0, SIZES.batch_size))
    assert probe_metrics(model, shuffled)["behaviour_nll"] > own + 0.1
    # and a perturbed model keeps less of the behaviour
    perturbed = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert probe_metrics(perturbed, probes)["behaviour_nll"] > own + 0.1


def test_base_answers_are_generated_once_per_build_and_are_deterministic(
    probed: tuple[torch.nn.Module, Probes],
) -> None:
    model, probes = probed
    assert build_probes(model, Words(), SIZES).answers == probes.answers
    calls = 0
    generate = model.generate

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return generate(*args, **kwargs)

    model.generate = counting  # type: ignore[method-assign]
    try:
        probe_metrics(model, probes)
        probe_metrics(model, probes)
    finally:
        del model.generate
    assert calls == 0  # scoring never generates


def test_skills_are_deterministic_untrained_and_right() -> None:
    assert not set(SKILLS) & set(TASKS)  # no target task trains them
    for skill in SKILLS:
        examples = skill_examples(skill, 20, seed=3)
        assert examples == skill_examples(skill, 20, seed=3) != skill_examples(skill, 20, seed=4)
        assert len({e.prompt for e in examples}) == 20
        for e in examples:
            assert e.prompt.startswith("Q: ") and e.prompt.endswith("\nA:")
            words = e.prompt.split(":")[2].split()[:-1]  # "Q: Copy: a b c\nA:" → a b c
            assert e.completion.split() == (words if skill == "copy" else words[-1:])


def test_a_skill_is_one_sequence_whose_labels_are_the_answers(probed: tuple[torch.nn.Module, Probes]) -> None:
    _, probes = probed
    words = Words()
    for skill in SKILLS:
        ((batch,),) = [probes.skills[skill]]
        shot, *asked = skill_examples(skill, SIZES.skill_questions + 1)
        labels = batch["labels"][0].tolist()
        assert (
            batch["input_ids"][0].tolist()
            == words(shot.prompt + shot.completion + "".join(f"\n\n{e.prompt}{e.completion}" for e in asked))[
                "input_ids"
            ]
        )
        runs = [[t for t in run.split(",") if t] for run in ",".join(map(str, labels)).split("-100")]
        answers = [[int(t) for t in run] for run in runs if run]
        assert answers == [words(e.completion)["input_ids"] for e in asked]  # the worked example's is no label


class Oracle(torch.nn.Module):
    """Predicts the next token of its input, plus ``shift`` where ``shift`` is given (a wrong answer)."""

    def __init__(self, shift: torch.Tensor | int = 0) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.shift = shift

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        following = torch.roll(input_ids, -1, dims=1) + self.shift
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following % 23, 23).double())


def test_a_model_that_answers_right_scores_exact_match_one(probed: tuple[torch.nn.Module, Probes]) -> None:
    _, probes = probed
    right, wrong = probe_metrics(Oracle(), probes), probe_metrics(Oracle(shift=1), probes)
    for skill in SKILLS:
        assert right[f"skill_{skill}_em"] == 1.0 and wrong[f"skill_{skill}_em"] == 0.0
    # every answer of a sequence counts on its own: one of two wrong is 0.5
    batch = {
        "input_ids": torch.tensor([[2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "labels": torch.tensor([[-100, 3, -100, -100, 6, 7], [-100, -100, 4, 5, -100, -100]]),
    }
    assert exact_match(Oracle(), [batch]) == 1.0
    assert exact_match(Oracle(shift=torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])), [batch]) == 2 / 3
    assert exact_match(Oracle(shift=torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])), [batch]) == 2 / 3


def test_probe_metrics_returns_every_probe(probed: tuple[torch.nn.Module, Probes]) -> None:
    model, probes = probed
    scores = probe_metrics(model, probes)
    assert list(scores) == list(PROBE_METRICS)
    assert all(math.isfinite(v) for v in scores.values())
    assert all(0.0 <= scores[f"skill_{s}_em"] <= 1.0 for s in SKILLS)
    assert sum(len(b["input_ids"]) for b in probes.near + probes.ood) == 2 * SIZES.texts
    assert max(b["input_ids"].shape[1] for b in probes.near + probes.ood) <= SIZES.max_length


def test_a_sweep_reports_every_probe_in_rows_csv_json_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = lively_llama().float()
    cfg = SweepConfig(methods=("lora", "l2"), strengths=(1.0,), seeds=(0, 1), steps=1, batch_size=4, targets="q_proj")
    probed = with_probes(data(), model, Words(), SweepConfig(probe_sizes=SIZES))
    assert with_probes(data(), model, Words(), SweepConfig(probes=False)).probes is None
    rows = run_sweep(model, Words(), probed, cfg, {})
    assert rows[0]["method"] == "base" and all(set(PROBE_METRICS) <= set(r) for r in rows)
    write_rows(rows, tmp_path / "runs.csv")
    assert read_rows(tmp_path / "runs.csv") == rows
    summary = summarize(rows)
    choices = choose(summary)
    write_json({"summary": summary, "choices": choices_json(choices)}, tmp_path / "summary.json")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert all({*PROBE_METRICS, *(f"{m}_std" for m in PROBE_METRICS)} <= set(s) for s in saved["summary"])
    assert set(saved["choices"][0]["probes"]) == set(PROBE_METRICS)
    text = table(summary)
    assert "forgetting probes" in text and "behaviour NLL" in text and "forgetting (PEFT)" in text
    assert len(text.splitlines()) == 2 * (1 + 3) + 1 + 2  # two tables, a blank line, the intervals' legend
    pareto_plot(summary, tmp_path / "pareto.png", "tiny")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    # rows of an older sweep without probes resume beside new ones: empty cells, no probe means
    older = {k: v for k, v in rows[0].items() if not k.startswith(PROBE_METRICS)}
    write_rows([older, *rows[1:]], tmp_path / "mixed.csv")
    mixed = read_rows(tmp_path / "mixed.csv")
    assert mixed[0]["near_nll"] is None and "near_nll" not in summarize(mixed)[0]
    assert "near_nll" in summarize(mixed)[1]
    # resuming them with the probes on scores the base model's row on the probes too
    resumed = run_sweep(model, Words(), probed, cfg, {}, done=mixed)
    assert resumed[1:] == mixed[1:] and resumed[0]["near_nll"] == rows[0]["near_nll"]


def test_forgetting_is_pefts_mean_per_token_loss_after_minus_before() -> None:
    """PEFT's MetaMathQA benchmark: every token's loss on general text pooled, after minus before."""
    import torch.nn.functional as F

    model = lively_llama().float()
    cfg = SweepConfig(methods=("lora",), seeds=(0, 1), steps=3, batch_size=4, targets="q_proj,v_proj", lr=0.05)
    probed = with_probes(data(), model, Words(), SweepConfig(probe_sizes=SIZES))
    rows = run_sweep(model, Words(), probed, cfg, {})
    (lora,) = [s for s in summarize(rows) if s["method"] == "lora"]

    def mean_token_loss(m: torch.nn.Module) -> float:  # brute force: each next-token loss, pooled
        losses = []
        for batch in probed.probes.ood:
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            token = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
            losses += token[targets.flatten() != -100].tolist()
        return sum(losses) / len(losses)

    from laplace_hub.evaluation.sweep import finetune

    tuned = [finetune(model, Words(), probed.train, "lora", 0.0, {}, cfg, s)[0] for s in cfg.seeds]
    with torch.no_grad():
        before = mean_token_loss(model)
        after = [mean_token_loss(m) for m in tuned]
    expected = sum(a - before for a in after) / len(after)  # equal token counts per seed: the pooled mean
    assert abs(expected) > 1e-4  # the fine-tuning moved the loss
    assert lora["forgetting"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    low, high = lora["forgetting_ci"]
    assert low <= lora["forgetting"] <= high
