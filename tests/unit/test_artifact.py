"""Artifacts on disk: exact round trips, sharding, atomic writes, lazy reads, clear refusals."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from laplace_hub.artifact import Artifact, ArtifactBuilder, minimal_fields, store
from laplace_hub.curvature import DenseFactor, DiagBlock, KronBlock
from laplace_hub.errors import ArtifactError, ArtifactNotFoundError, LaplaceHubError, UnsupportedVersionError
from tests.conftest import CONFORMANCE, CONFORMANCE_1_1


def build(dtype: str = "float32", packed: bool = False) -> Artifact:
    gen = torch.Generator().manual_seed(0)
    builder = ArtifactBuilder(dtype=dtype, packed=packed)  # type: ignore[arg-type]
    x = torch.randn(8, 8, generator=gen)
    shared = DenseFactor(x @ x.T)
    for i in range(6):
        g = torch.randn(4, 4, generator=gen)
        builder.add(f"layers.{i}.q", (4, 8), KronBlock(shared, DenseFactor(g @ g.T)))
        builder.add(f"layers.{i}.d", (4, 8), DiagBlock(torch.rand(4, 8, generator=gen)))
    return builder.build(**minimal_fields())


def test_writing_holds_one_shard_of_tensors_at_a_time(tmp_path: Path) -> None:
    art = build()
    live: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    held = []

    def fetch(key: str) -> torch.Tensor:
        tensor = art.tensor(key).clone()  # a fresh tensor, as a file-backed artifact reads it
        live.add(tensor)
        held.append(len(live))
        return tensor

    shard = 2 * 8 * 8 * 4  # bytes: two 8×8 float32 factors, or a few smaller tensors
    saved = Artifact(art.manifest, fetch).save(tmp_path / "a", max_shard_bytes=shard)
    shards = json.loads((tmp_path / "a" / "laplace.safetensors.index.json").read_text())["weight_map"]
    per_shard = max(list(shards.values()).count(name) for name in set(shards.values()))
    assert len(set(shards.values())) == 3 and len(held) == len(shards)  # each tensor fetched once
    assert max(held) <= per_shard < len(shards)  # never more alive than one shard holds
    assert all(torch.equal(saved.tensor(k), art.tensor(k)) for k in shards)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64", "float16"])
@pytest.mark.parametrize("max_shard_bytes", [store.DEFAULT_MAX_SHARD_BYTES, 200])
def test_round_trip_is_bit_identical(tmp_path: Path, dtype: str, max_shard_bytes: int) -> None:
    art = build(dtype)
    saved = art.save(tmp_path / "a", max_shard_bytes=max_shard_bytes)
    originals, loaded = art.tensors(), saved.tensors()
    assert originals.keys() == loaded.keys()
    for key in originals:
        assert torch.equal(originals[key], loaded[key]), key
        assert originals[key].dtype == loaded[key].dtype
    assert saved.manifest.model_copy(update={"files": {}}) == art.manifest
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes == 200)
    resaved = saved.save(tmp_path / "b", max_shard_bytes=max_shard_bytes)
    assert resaved.manifest.files == saved.manifest.files  # deterministic bytes


def test_shared_factor_is_stored_once(tmp_path: Path) -> None:
    manifest = build().save(tmp_path / "a").manifest
    keys = {m.blocks[0].input.key for n, m in manifest.modules.items() if n.endswith(".q")}
    assert keys == {"layers.0.q.weight.all.input"}


def test_packed_factors_read_back_as_full_matrices(tmp_path: Path) -> None:
    packed = build(packed=True).save(tmp_path / "p")
    full = build().save(tmp_path / "f")
    assert packed.nbytes() < full.nbytes()
    for name in full.manifest.modules:
        torch.testing.assert_close(packed.block(name).dense(), full.block(name).dense())


def test_tensor_files_identify_themselves(tmp_path: Path) -> None:
    build().save(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "laplace.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "laplace-hub/1.0"}


def test_crash_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "sha256_file", explode)
    with pytest.raises(OSError, match="disk full"):
        build().save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    build().save(tmp_path / "a")
    with pytest.raises(ArtifactError, match="overwrite"):
        build().save(tmp_path / "a")
    build().save(tmp_path / "a", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_open_refuses_what_the_validator_refuses(tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError):
        Artifact.open(tmp_path / "nothing")
    with pytest.raises(UnsupportedVersionError, match=r"2\.0 .* 1\.x"):
        Artifact.open(CONFORMANCE / "invalid" / "unknown-major")
    with pytest.raises(ArtifactError, match="not allowed"):
        Artifact.open(CONFORMANCE / "invalid" / "shard-escape")


def test_open_checksums_on_request() -> None:
    Artifact.open(CONFORMANCE / "invalid" / "checksum-mismatch")  # lazy: sizes only
    with pytest.raises(ArtifactError, match="sha256"):
        Artifact.open(CONFORMANCE / "invalid" / "checksum-mismatch", verify_checksums=True)


def test_newer_minor_loads_with_warning(tmp_path: Path) -> None:
    folder = tmp_path / "newer"
    shutil.copytree(CONFORMANCE_1_1 / "valid" / "newer-minor-1.2", folder)
    raw = json.loads((folder / "laplace.json").read_text())
    raw["spec_version"] = "1.99"
    (folder / "laplace.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="future_field"):
        from laplace_hub.manifest import parse_manifest

        manifest = parse_manifest(raw)
    assert manifest.model_extra == {"future_field": {"added_in": "1.2"}}
    with pytest.warns(UserWarning, match="future_field"):
        assert Artifact.open(folder).block("model.layers.0.self_attn.q_proj")


def test_separate_datasets_combine_with_their_weights() -> None:
    art = Artifact.open(CONFORMANCE / "valid" / "weight-kron-separate-mc")
    name = "model.layers.0.self_attn.q_proj"
    docs, code = art.block(name, "docs", dtype=torch.float64), art.block(name, "code", dtype=torch.float64)
    torch.testing.assert_close(art.block(name, dtype=torch.float64).dense(), docs.dense() + 0.5 * code.dense())


def test_lora_artifact_gives_pair_blocks_and_init() -> None:
    for vector in ("lora-diag", "lora-kron", "lora-kron-tridiag"):
        art = Artifact.open(CONFORMANCE / "valid" / vector)
        name = "model.layers.0.self_attn.q_proj"
        a0, b0 = art.lora_init(name)
        assert a0.shape == (2, 4) and b0.shape == (6, 2)
        pair = art.block(name, dtype=torch.float64)
        assert pair.dense().shape == (2 * 4 + 6 * 2,) * 2


def test_unknown_module_names_the_known_ones() -> None:
    art = Artifact.open(CONFORMANCE / "valid" / "weight-kron")
    with pytest.raises(ArtifactError, match=r"no module 'nope'.*q_proj"):
        art.block("nope")


def test_copy_of_a_vector_is_still_valid(tmp_path: Path) -> None:
    shutil.copytree(CONFORMANCE / "valid" / "weight-kron-sharded", tmp_path / "a")
    assert Artifact.open(tmp_path / "a", verify_checksums=True).manifest.modules


def test_a_reader_error_says_how_to_see_every_finding_without_a_stale_path() -> None:
    folder = CONFORMANCE_1_1 / "invalid" / "lineage-incomplete"
    with pytest.raises(LaplaceHubError, match="`laplace-hub validate` lists every finding") as info:
        Artifact.open(folder)
    assert str(folder) not in str(info.value)
