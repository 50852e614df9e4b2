"""Continual posteriors: merging is exact (dense check), records its lineage, and in a two-task run on a
tiny model the merged posterior protects both the source and task 1."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from laplace_hub.artifact import Artifact, merge
from laplace_hub.consumers import LaplaceRegularizer
from laplace_hub.data import pad_batch
from laplace_hub.errors import ArtifactError, ModelMismatchError
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.validate import validate
from tests.conftest import run_cli, save_tiny_artifact, tiny_llama

TARGETS = "q_proj,v_proj"


def batches(kind: str, seed: int, n: int = 12) -> list[dict[str, torch.Tensor]]:
    """Token sequences that count from a random start: by 3 (source), 1 (task 1) or -2 (task 2)."""
    gen = torch.Generator().manual_seed(seed)
    step = {"source": 3, "task1": 1, "task2": -2}[kind]
    seqs = []
    for _ in range(n):
        start = int(torch.randint(1, 23, (1,), generator=gen))
        seqs.append([1 + (start + step * i) % 22 for i in range(8)])
    return [pad_batch(seqs[i : i + 4], 0) for i in range(0, n, 4)]


def pretrained_on_source() -> torch.nn.Module:
    """A base model that knows the source, so that forgetting it can be measured."""
    model = tiny_llama()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    source = batches("source", 0)
    for step in range(150):
        optimizer.zero_grad()
        model(**source[step % len(source)]).loss.backward()
        optimizer.step()
    return model.eval()


def curvature(model: torch.nn.Module, data: list, name: str, structure: str = "kron") -> Artifact:
    # MC Fisher: the empirical one vanishes where a model fits its data, as the pretrained base does

    options = ComputeOptions(
        structure=structure, estimator="mc", mc_samples=4, accumulate_dtype=torch.float64, dtype="float64"
    )  # type: ignore[arg-type]
    return compute_artifact(model, {name: data}, select_targets(model, TARGETS), options, BaseModelInfo(repo_id=name))


def test_merged_precision_is_decayed_prior_plus_new(tmp_path: Path) -> None:
    base, moved = tiny_llama(), tiny_llama()
    with torch.no_grad():
        moved.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    prior = curvature(base, batches("source", 0), "source").save(tmp_path / "prior")
    new = curvature(moved, batches("task1", 1), "task1", structure="diag_lowrank")
    merged = merge(prior, new, decay=0.3, sources=(str(tmp_path / "prior"), None)).save(tmp_path / "merged")
    assert validate(tmp_path / "merged").valid
    m = merged.manifest
    assert (
        m.spec_version == "1.3" and m.base_model == new.manifest.base_model
    )  # lineage (1.1), v2 fingerprints (1.3); the mean moves
    assert [(e.datasets, e.decay) for e in m.lineage or []] == [(["source"], 0.3), (["task1"], 1.0)]
    assert (
        m.lineage[0].manifest_sha256 == hashlib.sha256((tmp_path / "prior" / "laplace.json").read_bytes()).hexdigest()
    )
    assert m.lineage[0].base_model.fingerprint == prior.manifest.base_model.fingerprint
    for name in m.modules:
        expected = 0.3 * prior.block(name, dtype=torch.float64).dense() + new.block(name, dtype=torch.float64).dense()
        torch.testing.assert_close(merged.block(name, dtype=torch.float64).dense(), expected)


def test_merging_again_flattens_the_lineage_and_compounds_the_decay() -> None:
    model = tiny_llama()
    a, b, c = (curvature(model, batches(k, s), k) for k, s in (("source", 0), ("task1", 1), ("task2", 2)))
    twice = merge(merge(a, b, decay=0.5), c, decay=0.5)
    assert [(e.datasets, e.decay) for e in twice.manifest.lineage or []] == [
        (["source"], 0.25),
        (["task1"], 0.5),
        (["task2"], 1.0),
    ]
    assert all(key.count("/") == 1 for key in twice.tensors())  # keys do not grow with each merge
    name = "model.layers.1.self_attn.v_proj"
    expected = sum(w * x.block(name, dtype=torch.float64).dense() for w, x in ((0.25, a), (0.5, b), (1.0, c)))
    torch.testing.assert_close(twice.block(name, dtype=torch.float64).dense(), expected)


def test_merge_refuses_what_does_not_add() -> None:
    model = tiny_llama()
    a = curvature(model, batches("source", 0), "source")
    with pytest.raises(ArtifactError, match="decay"):
        merge(a, a, decay=1.5)
    per_token = compute_artifact(
        model,
        {"t": batches("task1", 1)},
        select_targets(model, TARGETS),
        ComputeOptions(normalization="per_token"),
        BaseModelInfo(repo_id="t"),
    )
    with pytest.raises(ArtifactError, match="normalization differs"):
        merge(a, per_token)
    fewer = compute_artifact(
        model, {"t": batches("task1", 1)}, select_targets(model, "q_proj"), ComputeOptions(), BaseModelInfo(repo_id="t")
    )
    with pytest.raises(ArtifactError, match="different modules"):
        merge(a, fewer)
    lora = compute_artifact(
        model,
        {"t": batches("task1", 1)},
        select_targets(model, TARGETS),
        ComputeOptions(parameterization="lora", lora_rank=2),
        BaseModelInfo(repo_id="t"),
    )
    with pytest.raises(ArtifactError, match="lora-parameterised"):
        merge(a, lora)


def train(model: torch.nn.Module, data: list, reg: LaplaceRegularizer | None, steps: int = 60) -> torch.nn.Module:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    for step in range(steps):
        batch = data[step % len(data)]
        optimizer.zero_grad()
        loss = model(**batch).loss + (reg() if reg is not None else 0.0)
        loss.backward()
        optimizer.step()
    return model


def loss(model: torch.nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in data) / len(data)


def adapter(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.split(","), lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(model), config).double()


def test_two_tasks_in_sequence_the_merged_posterior_protects_source_and_task_1(tmp_path: Path) -> None:
    source, task1, task2 = batches("source", 0), batches("task1", 1), batches("task2", 2)
    base = pretrained_on_source()
    prior = curvature(base, source, "source")
    first = adapter(base)
    train(first, task1, LaplaceRegularizer.from_artifact(prior, first, strength=1.0))
    after_1 = first.merge_and_unload()  # the new mean: the fine-tuned weights
    posterior = merge(prior, curvature(after_1, task1, "task1"))
    with pytest.raises(ModelMismatchError, match="continual posterior"):  # it anchors at the new weights
        LaplaceRegularizer.from_artifact(posterior, adapter(base), strength=1.0)

    def forgetting(artifact: Artifact | None) -> tuple[float, float]:
        model = adapter(after_1)
        reg = None
        if artifact is not None:
            reg = LaplaceRegularizer.from_artifact(artifact, model, strength=3.0, check_fingerprint=False)
        train(model, task2, reg)
        assert loss(model, task2) < loss(after_1, task2)  # task 2 is learned in every case
        return loss(model, source) - loss(after_1, source), loss(model, task1) - loss(after_1, task1)

    plain_source, plain_task1 = forgetting(None)
    prior_source, prior_task1 = forgetting(prior)
    merged_source, merged_task1 = forgetting(posterior)
    assert plain_source > 0.5 and plain_task1 > 0.5  # without a penalty task 2 overwrites both
    assert prior_source < 0.75 * plain_source  # the source prior alone protects the source ...
    assert merged_task1 < 0.25 * prior_task1 and merged_task1 < 0.25 * plain_task1  # ... only the merge task 1
    assert merged_source < 0.25 * plain_source  # and the source stays protected in the merge


def test_cli_merge_writes_a_valid_posterior_and_refuses_bad_input(tmp_path: Path) -> None:
    model = tiny_llama()
    curvature(model, batches("source", 0), "source").save(tmp_path / "a")
    curvature(model, batches("task1", 1), "task1").save(tmp_path / "b")
    result = run_cli(
        "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--decay", "0.9", "--out", str(tmp_path / "c"), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert Artifact.open(tmp_path / "c").manifest.lineage[0].source == str(tmp_path / "a")
    bad = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "--decay", "0", "--out", str(tmp_path / "d"))
    assert bad.returncode == 1 and "decay" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "d").exists()
    missing = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "d"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_the_model_card_of_a_posterior_lists_its_lineage() -> None:
    from laplace_hub.hub.card import build_card, card_metadata
    from tests.conftest import CONFORMANCE_1_1

    posterior = Artifact.open(CONFORMANCE_1_1 / "valid" / "merged-kron")
    assert card_metadata(posterior)["laplace_hub"]["lineage_parts"] == 2
    card = build_card(posterior, "me/posterior")
    assert "## Lineage" in card and "| 0 | example/model | source | 0.5 |" in card


def test_inspect_shows_the_lineage() -> None:
    import json

    from tests.conftest import CONFORMANCE_1_1

    result = run_cli("inspect", str(CONFORMANCE_1_1 / "valid" / "merged-kron"), "--json")
    assert [part["decay"] for part in json.loads(result.stdout)["lineage"]] == [0.5, 1.0]
    text = run_cli("inspect", str(CONFORMANCE_1_1 / "valid" / "merged-kron")).stdout
    assert "γ=0.5 source computed at example/model" in text


def test_a_posterior_in_both_regulariser_modes_equals_its_dense_form() -> None:
    model = tiny_llama()
    posterior = merge(
        curvature(model, batches("source", 0), "source"),
        curvature(model, batches("task1", 1), "task1", structure="diag_lowrank"),
        decay=0.7,
    )
    peft = adapter(model)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    weight = LaplaceRegularizer.from_artifact(posterior, peft, strength=2.0)
    at_init = LaplaceRegularizer.from_artifact(posterior, peft, strength=2.0, mode="lora_init")
    from laplace_hub.consumers import adapted_modules

    modules = list(adapted_modules(peft))
    inits = [(m.lora_a.detach().clone(), m.lora_b.detach().clone()) for m in modules]
    with torch.no_grad():
        for m in modules:
            m.lora_a.add_(0.1)
    expected_weight, expected_init = 0.0, 0.0
    for m, (a0, b0) in zip(modules, inits, strict=True):
        dense = posterior.block(m.name, dtype=torch.float64)
        delta = (m.scaling * m.lora_b @ m.lora_a).reshape(-1)
        expected_weight += float(delta @ dense.dense() @ delta)
        moved = torch.cat([(m.lora_a - a0).reshape(-1), (m.lora_b - b0).reshape(-1)])
        expected_init += float(moved @ dense.project_lora(a0, b0, m.scaling).dense() @ moved)
    torch.testing.assert_close(float(weight()), expected_weight, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(float(at_init()), expected_init, rtol=1e-5, atol=1e-8)


def test_merging_an_artifact_with_its_compressed_copy_warns(tmp_path: Path) -> None:
    """The same curvature twice is a user error the posterior cannot show: it is said, not silent."""
    from laplace_hub.artifact import compress

    folder = save_tiny_artifact(tiny_llama(), tmp_path / "a")
    artifact = Artifact.open(folder)
    with pytest.warns(UserWarning, match="counts that curvature twice"):
        merge(artifact, compress(artifact, dtype="bfloat16"))
