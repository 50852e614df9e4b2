"""Compact artifacts: every transform checked against dense matrices in float64, low dtypes against
float32 on random updates, the provenance record, and the command's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from laplace_hub.artifact import Artifact, ArtifactBuilder, compress, minimal_fields
from laplace_hub.artifact.compress import PROVENANCE_KEY
from laplace_hub.cli import main
from laplace_hub.curvature import DenseFactor, DiagBlock, DiagLowRankBlock, KronBlock
from laplace_hub.errors import ArtifactError
from laplace_hub.manifest import DatasetInfo, KronEigBlockEntry
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE, CONFORMANCE_1_1


def spd(n: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """A PSD matrix with a decaying spectrum (as curvature factors have), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = decay ** torch.arange(n, dtype=torch.float64) * (
        1 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)
    )
    return (q * values) @ q.T


def kron_artifact(dtype: str = "float64", packed: bool = False) -> Artifact:
    """Two square modules sharing one input factor (as q/k/v do) and one rectangular module."""
    builder = ArtifactBuilder(dtype=dtype, packed=packed)  # type: ignore[arg-type]
    shared = DenseFactor(spd(6, 0))
    builder.add("q", (6, 6), KronBlock(shared, DenseFactor(spd(6, 1))))
    builder.add("k", (5, 6), KronBlock(shared, DenseFactor(spd(5, 2))))
    builder.add("o", (6, 7), KronBlock(DenseFactor(spd(7, 3)), DenseFactor(spd(6, 4))))
    return builder.build(**minimal_fields())


def dense(artifact: Artifact, name: str) -> torch.Tensor:
    return artifact.block(name, dtype=torch.float64).dense()


def test_kron_to_kron_eig_at_full_rank_is_the_dense_precision() -> None:
    """Rank n−1 is full rank (the tail is the last eigenvalue): the decoded P is the source's."""
    builder = ArtifactBuilder(dtype="float64")
    builder.add("a", (5, 5), KronBlock(DenseFactor(spd(5, 0)), DenseFactor(spd(5, 1))))
    builder.add("b", (5, 5), KronBlock(DenseFactor(spd(5, 2)), DenseFactor(spd(5, 3))))
    source = builder.build(**minimal_fields())
    small = compress(source, rank=4)
    for name in ("a", "b"):
        torch.testing.assert_close(dense(small, name), dense(source, name), rtol=1e-10, atol=1e-12)


def test_dense_factors_lowered_to_bfloat16_keep_the_penalty_of_the_stored_numbers(tmp_path: Path) -> None:
    """No ridge: a bf16 dense factor's penalty is the exact form of its raw numbers' PSD part (SPEC.md §8.3).

    Before 1.3 readers added ``τ·‖F‖_F·I`` and compress refused this (the penalty moved by ~5 %).
    """
    source = kron_artifact(dtype="float32")
    compress(source, dtype="bfloat16").save(tmp_path / "bf16", verify=True)
    assert validate(tmp_path / "bf16").valid
    small = Artifact.open(tmp_path / "bf16")
    gen = torch.Generator().manual_seed(0)
    for name, module in small.manifest.modules.items():
        block = module.blocks[0]
        raw = {side: small.tensor(getattr(block, side).key).double() for side in ("input", "output")}
        exact = {side: (m + m.T) / 2 for side, m in raw.items()}  # PD here: the decode changes nothing else
        for _ in range(8):
            delta = torch.randn(*module.shape, generator=gen, dtype=torch.float64)
            form = torch.trace(exact["output"] @ delta @ exact["input"] @ delta.T).item()
            assert small.block(name, dtype=torch.float64).quad(delta).item() == pytest.approx(form, rel=1e-12)
            # and within bf16's rounding of the float32 source's
            assert small.block(name).quad(delta.float()).item() == pytest.approx(
                source.block(name).quad(delta.float()).item(), rel=2e-2
            )


def test_shared_factors_stay_shared() -> None:
    small = compress(kron_artifact(), rank=3)
    entries = {name: m.blocks[0] for name, m in small.manifest.modules.items()}
    assert isinstance(entries["q"], KronEigBlockEntry) and isinstance(entries["k"], KronEigBlockEntry)
    assert entries["q"].input.eigenvectors == entries["k"].input.eigenvectors
    assert len(small.tensors()) == 2 * 5  # q, k share Σx: 5 eigen factors of two tensors each


@pytest.mark.parametrize("packed", [False, True])
def test_kron_eig_at_rank_k_is_the_truncated_eigen_decomposition(packed: bool) -> None:
    source = kron_artifact(packed=packed)
    small = compress(source, rank=2)
    for name in ("q", "k", "o"):
        full = source.block(name, dtype=torch.float64)
        expected = KronBlock(full.input.compress(2), full.output.compress(2))  # type: ignore[attr-defined]
        torch.testing.assert_close(dense(small, name), expected.dense(), rtol=1e-9, atol=1e-12)
    assert validate_in_memory(small)


def test_truncating_kron_eig_recomputes_the_tail_as_brute_force_does() -> None:
    """From rank 5 with tail t to rank 2: t' = (Σ dropped λ + (n−5)·t)/(n−2) = mean of the n−2 smallest."""
    n = 9
    factor = spd(n, 5, decay=0.8)
    builder = ArtifactBuilder(dtype="float64")
    builder.add("m", (n, n), KronBlock(DenseFactor(factor), DenseFactor(spd(n, 6))).compress(5))
    source = builder.build(**minimal_fields())
    small = compress(source, rank=2)
    entry = small.manifest.modules["m"].blocks[0]
    assert isinstance(entry, KronEigBlockEntry) and entry.input.rank == 2
    values, vectors = torch.linalg.eigh(factor)
    values, vectors = values.flip(0), vectors.flip(1)
    assert entry.input.tail == pytest.approx(float(values[2:].mean()), rel=1e-12)
    torch.testing.assert_close(small.tensor(entry.input.eigenvalues), values[:2])
    kept = small.tensor(entry.input.eigenvectors)
    torch.testing.assert_close((kept.T @ vectors[:, :2]).abs(), torch.eye(2, dtype=torch.float64))
    brute = KronBlock(DenseFactor(factor), DenseFactor(spd(n, 6))).compress(2)
    torch.testing.assert_close(dense(small, "m"), brute.dense(), rtol=1e-9, atol=1e-12)
    # and truncating twice is truncating once
    torch.testing.assert_close(dense(compress(compress(source, rank=4), rank=2), "m"), dense(small, "m"))


def lowrank_artifact(orthogonal: bool) -> Artifact:
    gen = torch.Generator().manual_seed(7)
    d_out, d_in, k = 3, 4, 4
    u = torch.randn(k, d_out * d_in, generator=gen, dtype=torch.float64)
    if orthogonal:  # as the sketch gives them: orthogonal, norms decreasing
        q, _ = torch.linalg.qr(u.T)
        u = (q.T * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)[:, None]).contiguous()
    diagonal = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64)
    builder = ArtifactBuilder(dtype="float64")
    builder.add("m", (d_out, d_in), DiagLowRankBlock(diagonal, u.reshape(k, d_out, d_in)))
    builder.add("d", (d_out, d_in), DiagBlock(diagonal))
    return builder.build(**minimal_fields())


@pytest.mark.parametrize("orthogonal", [True, False])
def test_lowering_diag_lowrank_keeps_the_diagonal_and_the_top_directions(orthogonal: bool) -> None:
    source = lowrank_artifact(orthogonal)
    small = compress(source, rank=2)
    before, after = dense(source, "m"), dense(small, "m")
    torch.testing.assert_close(after.diagonal(), before.diagonal())  # D' = D + Σ_dropped Uⱼ²
    entry = small.manifest.modules["m"].blocks[0]
    kept = small.tensor(entry.lowrank).reshape(2, -1)  # type: ignore[union-attr]
    u = source.tensor(source.manifest.modules["m"].blocks[0].lowrank).reshape(4, -1)  # type: ignore[union-attr]
    assert torch.linalg.eigvalsh(u.T @ u - kept.T @ kept).min() > -1e-12  # U'U'ᵀ ⪯ UUᵀ (⪯ the Fisher)
    values, vectors = torch.linalg.eigh(u.T @ u)
    top = vectors[:, -2:].flip(1) * values[-2:].flip(0).sqrt()  # the best rank-2 part of UUᵀ
    torch.testing.assert_close(kept.T @ kept, top @ top.T)
    if orthogonal:  # ... which is the first two directions themselves, up to sign
        torch.testing.assert_close(kept.abs(), u[:2].abs())
    torch.testing.assert_close(dense(small, "d"), dense(source, "d"))  # diag unchanged


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_penalty_is_within_one_percent_of_float32(dtype: str) -> None:
    """Random LoRA-sized updates; the numbers are printed (pytest -s) for docs/publisher.md."""
    builder = ArtifactBuilder(dtype="float32")
    shapes = {"q": (32, 32), "v": (16, 32)}
    for name, (d_out, d_in) in shapes.items():
        block = KronBlock(DenseFactor(spd(d_in, 10, decay=0.9)), DenseFactor(spd(d_out, 11, decay=0.9)))
        builder.add(name, (d_out, d_in), block.compress(8))
    gen = torch.Generator().manual_seed(0)
    builder.add("d", (16, 32), DiagBlock(torch.rand(16, 32, generator=gen) * 1e-3))
    source = builder.build(**minimal_fields())
    small = compress(source, dtype=dtype)  # type: ignore[arg-type]
    assert small.nbytes() * 2 == source.nbytes()
    errors = []
    for _ in range(5):
        deltas = {
            name: torch.randn(*source.manifest.modules[name].shape, generator=gen, dtype=torch.float64)
            for name in ("q", "v", "d")
        }
        exact = sum(float(source.block(n, dtype=torch.float64).quad(d)) for n, d in deltas.items())
        compact = sum(float(small.block(n, dtype=torch.float64).quad(d)) for n, d in deltas.items())
        errors.append(abs(compact - exact) / exact)
    print(f"{dtype}: penalty relative errors vs float32 {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= 1e-2
    assert validate_in_memory(small)


def validate_in_memory(artifact: Artifact) -> bool:
    """Saved with every rule (values, checksums) checked on the way back."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        artifact.save(Path(tmp) / "a", verify=True)
        return validate(Path(tmp) / "a").valid


@pytest.mark.parametrize(
    "vector",
    [
        CONFORMANCE / "valid" / "weight-kron",
        CONFORMANCE / "valid" / "weight-kron-packed",
        CONFORMANCE / "valid" / "weight-kron-separate-mc",
        CONFORMANCE / "valid" / "weight-kron-eig",
        CONFORMANCE / "valid" / "weight-diag",
        CONFORMANCE / "valid" / "lora-diag",
        CONFORMANCE / "valid" / "lora-kron",
        CONFORMANCE / "valid" / "lora-kron-tridiag",
        CONFORMANCE_1_1 / "valid" / "merged-kron",
        CONFORMANCE_1_1 / "valid" / "weight-diag-lowrank",
        CONFORMANCE_1_1 / "valid" / "lora-diag-lowrank",
    ],
    ids=lambda p: p.name,
)
def test_every_structure_compresses_to_a_valid_artifact_that_keeps_the_rest(vector: Path, tmp_path: Path) -> None:
    source = Artifact.open(vector)
    has_rank = any(
        b.structure in ("kron_eig", "diag_lowrank") or (b.structure == "kron" and b.param == "weight")
        for m in source.manifest.modules.values()
        for b in m.blocks
    )
    dtype = "bfloat16"
    small = compress(source, rank=1 if has_rank else None, dtype=dtype).save(tmp_path / "a", verify=True)
    assert validate(tmp_path / "a").valid
    m, s = source.manifest, small.manifest
    for field in ("base_model", "parameterization", "estimator", "datasets", "datasets_combined", "lineage", "license"):
        assert getattr(s, field) == getattr(m, field), field
    assert s.dtype == dtype and small.nbytes() < source.nbytes()
    for name, module in m.modules.items():
        if module.lora_init is not None:  # the init keeps its own dtype, bit for bit
            for a, b in zip(source.lora_init(name), small.lora_init(name), strict=True):
                assert torch.equal(a, b)
        small.block(name)  # decodes


def test_provenance_names_the_source_and_what_was_done(tmp_path: Path) -> None:
    kron_artifact(dtype="float32").save(tmp_path / "src")
    source = Artifact.open(tmp_path / "src")
    once = compress(source, rank=3, dtype="bfloat16").save(tmp_path / "once")
    record = once.manifest.software[PROVENANCE_KEY]
    sha = __import__("hashlib").sha256((tmp_path / "src" / "laplace.json").read_bytes()).hexdigest()
    assert str(tmp_path / "src") in record and sha in record
    assert "rank=3" in record and "dtype=float32->bfloat16" in record
    assert {k: v for k, v in once.manifest.software.items() if k != PROVENANCE_KEY} == source.manifest.software
    twice = compress(once, rank=2).save(tmp_path / "twice")
    assert twice.manifest.software[PROVENANCE_KEY] == record  # the first record is kept
    assert "rank=2" in twice.manifest.software[f"{PROVENANCE_KEY}.2"]


def test_what_compress_refuses() -> None:
    art = kron_artifact(dtype="float32")
    with pytest.raises(ArtifactError, match="nothing to do"):
        compress(art)
    with pytest.raises(ArtifactError, match="≥ 1") as info:
        compress(art, rank=0)
    assert info.value.location == "rank"
    with pytest.raises(ArtifactError, match="not below the side 5 of module 'k'"):
        compress(art, rank=5)
    with pytest.raises(ArtifactError, match="raise the precision"):
        compress(art, dtype="float64")
    bf16 = compress(art, rank=3, dtype="bfloat16")
    with pytest.raises(ArtifactError, match="round twice"):
        compress(bf16, dtype="float16")
    with pytest.raises(ArtifactError, match="raise the precision"):
        compress(bf16, dtype="float32")
    with pytest.raises(ArtifactError, match="lowers no rank"):
        compress(compress(art, rank=3), rank=3)
    with pytest.raises(ArtifactError, match="lowers no rank"):
        compress(Artifact.open(CONFORMANCE / "valid" / "weight-diag"), rank=2)
    builder = ArtifactBuilder(dtype="float32")
    builder.add("m", (2, 2), DiagBlock(torch.full((2, 2), 1e5)))
    with pytest.raises(ArtifactError, match="float16's largest value"):
        compress(builder.build(**minimal_fields()), dtype="float16")


def test_a_separate_dataset_artifact_keeps_its_datasets_and_weights() -> None:
    builder = ArtifactBuilder(dtype="float64")
    for dataset in ("a", "b"):
        builder.add("m", (4, 4), KronBlock(DenseFactor(spd(4, 1)), DenseFactor(spd(4, 2))), dataset=dataset)
    datasets = [
        DatasetInfo(name="a", sequences=4, tokens=8, batches=1),
        DatasetInfo(name="b", sequences=4, tokens=8, batches=1, weight=0.5),
    ]
    source = builder.build(**minimal_fields(datasets=datasets, datasets_combined="separate"))
    small = compress(source, rank=3)
    assert small.manifest.datasets == datasets
    torch.testing.assert_close(dense(small, "m"), dense(source, "m"), rtol=1e-10, atol=1e-12)


def test_saving_a_broken_artifact_with_verify_leaves_nothing(tmp_path: Path) -> None:
    builder = ArtifactBuilder(dtype="float32")
    builder.add("m", (2, 2), DiagBlock(torch.tensor([[1.0, -1.0], [1.0, 1.0]])))  # a negative precision
    with pytest.raises(ArtifactError, match="negative"):
        builder.build(**minimal_fields()).save(tmp_path / "a", verify=True)
    assert list(tmp_path.iterdir()) == []


# --- the command -------------------------------------------------------------------------------


def test_command_writes_a_smaller_valid_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kron_artifact(dtype="float32").save(tmp_path / "src")
    code = main(
        [
            "compress",
            str(tmp_path / "src"),
            "--rank",
            "2",
            "--dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["bytes_after"] < report["bytes_before"]
        and report["ratio"] == report["bytes_after"] / report["bytes_before"]
    )
    assert report["dtype"] == "bfloat16" and report["structures"] == ["kron_eig"]
    assert "rank=2" in report["provenance"]
    assert validate(tmp_path / "out").valid
    assert main(["compress", str(tmp_path / "src"), "--rank", "3", "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert "× the source" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rank", "0"], "--rank: must be ≥ 1"),
        (["--rank", "6"], "--rank: 6 is not below the side 6 of module 'q'"),
        (["--dtype", "float64"], "--dtype: float64 would raise the precision"),
        ([], "give a --rank, a --dtype or both"),
        (["--rank", "2", "--out", "{tmp}/src"], "already exists; pass --overwrite"),
    ],
)
def test_command_errors_are_one_line_and_leave_nothing(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kron_artifact(dtype="float32").save(tmp_path / "src")
    out = [] if "--out" in flags else ["--out", str(tmp_path / "out")]
    code = main(["compress", str(tmp_path / "src"), *[f.replace("{tmp}", str(tmp_path)) for f in flags], *out])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inspect_reports_bytes_against_the_covered_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(CONFORMANCE / "valid" / "weight-kron"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    covered = 2 * sum(m["shape"][0] * m["shape"][1] for m in summary["modules"].values())
    assert summary["covered_weights_bf16_bytes"] == covered
    assert summary["ratio_to_covered_weights_bf16"] == summary["tensor_bytes"] / covered
    assert summary["base_model_bf16_bytes"] is None and summary["ratio_to_base_model_bf16"] is None


def test_inspect_with_a_model_counts_its_parameters_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "model")  # a config alone: no weight is loaded
    parameters = sum(p.numel() for p in model.parameters())
    assert (
        main(["inspect", str(CONFORMANCE / "valid" / "weight-kron"), "--model", str(tmp_path / "model"), "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_model_bf16_bytes"] == 2 * parameters
    assert summary["ratio_to_base_model_bf16"] == summary["tensor_bytes"] / (2 * parameters)
    assert main(["inspect", str(CONFORMANCE / "valid" / "weight-kron"), "--model", str(tmp_path / "model")]) == 0
    assert "the whole base model at bf16" in capsys.readouterr().out
