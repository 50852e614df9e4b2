"""Write the conformance vectors and the JSON Schema of the current spec (run from the repository root).

    python spec/make_conformance.py            # regenerate both
    python spec/make_conformance.py --schema   # only the schema (what the staleness test checks)
    python spec/make_conformance.py --out DIR  # vectors into DIR (the reproducibility test)

Vectors live under ``conformance/<spec_version>/``: a vector goes to the lowest version able to
hold it, since writers write that version. The 1.0 vectors are therefore still written by this
script and must come out byte for byte as committed: a test regenerates them. Valid vectors cover
every structure and parameterization; each invalid vector is a valid one broken in one way, with
``expected.json`` naming the finding code the validator must report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from laplace_hub.artifact import Artifact, ArtifactBuilder, merge, minimal_fields
from laplace_hub.artifact.files import sha256_file
from laplace_hub.curvature import DenseFactor, DiagBlock, DiagLowRankBlock, KronBlock, WeightBlock
from laplace_hub.manifest import (
    SPEC_VERSION,
    BaseModelInfo,
    DatasetInfo,
    Estimator,
    LoraParameterization,
    manifest_json_schema,
    tensor_file_metadata,
)

HERE = Path(__file__).parent
SCHEMA = HERE / f"manifest-{SPEC_VERSION}.schema.json"
OUT = HERE / "conformance"
SHAPES = {"model.layers.0.self_attn.q_proj": (6, 4), "model.layers.0.self_attn.k_proj": (2, 4)}
RANK = 2


def psd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n + 1, generator=gen, dtype=torch.float64)
    return m @ m.T / (n + 1)


def weight_builder(
    structure: str,
    gen: torch.Generator,
    packed: bool = False,
    dtype: str = "float32",
    datasets: tuple[str | None, ...] = (None,),
) -> ArtifactBuilder:
    builder = ArtifactBuilder(dtype=dtype, packed=packed)  # type: ignore[arg-type]
    for dataset in datasets:
        shared_input = DenseFactor(psd(4, gen))
        shared_eig = shared_input.compress(2)
        for name, (d_out, d_in) in SHAPES.items():
            if structure == "diag":
                block = DiagBlock(torch.rand(d_out, d_in, generator=gen, dtype=torch.float64))
            elif structure == "diag_lowrank":
                block = DiagLowRankBlock(
                    torch.rand(d_out, d_in, generator=gen, dtype=torch.float64),
                    torch.randn(RANK, d_out, d_in, generator=gen, dtype=torch.float64),
                )
            elif structure == "kron_eig":
                block = KronBlock(shared_eig, DenseFactor(psd(d_out, gen)).compress(2))
            else:
                block = KronBlock(shared_input, DenseFactor(psd(d_out, gen)))
            builder.add(name, (d_out, d_in), block, dataset)
    return builder


def lora_builder(structure: str, gen: torch.Generator) -> ArtifactBuilder:
    builder = ArtifactBuilder()
    for name, (d_out, d_in) in SHAPES.items():
        a = torch.randn(RANK, d_in, generator=gen, dtype=torch.float64)
        b = torch.randn(d_out, RANK, generator=gen, dtype=torch.float64)
        diagonal = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) if structure.startswith("diag") else None
        weight: WeightBlock
        if structure == "diag_lowrank":
            weight = DiagLowRankBlock(diagonal, torch.randn(RANK, d_out, d_in, generator=gen, dtype=torch.float64))  # type: ignore[arg-type]
        elif diagonal is not None:
            weight = DiagBlock(diagonal)
        else:
            weight = KronBlock(DenseFactor(psd(d_in, gen)), DenseFactor(psd(d_out, gen)))
        builder.add(name, (d_out, d_in), weight.project_lora(a, b, 1.0, structure == "kron_tridiag"))
        builder.set_lora_init(name, a, b)
    return builder


LORA = LoraParameterization(kind="lora", rank=RANK, alpha=4.0, init_method="gaussian", init_seed=0)
SOFTWARE = {"generator": "spec/make_conformance.py"}


def valid_vectors() -> dict[str, Callable[[], object]]:
    def make(builder_fn: Callable[[torch.Generator], ArtifactBuilder], **fields: object) -> Callable[[], object]:
        return lambda: builder_fn(torch.Generator().manual_seed(0)).build(**minimal_fields(software=SOFTWARE, **fields))

    two = [
        DatasetInfo(name="docs", sequences=8, tokens=256, batches=2, weight=1.0),
        DatasetInfo(name="code", sequences=4, tokens=64, batches=1, weight=0.5),
    ]
    return {
        "weight-diag": make(lambda g: weight_builder("diag", g), kfac_approx=None),
        "weight-kron": make(lambda g: weight_builder("kron", g)),
        "weight-kron-packed": make(lambda g: weight_builder("kron", g, packed=True)),
        "weight-kron-eig": make(lambda g: weight_builder("kron_eig", g)),
        "weight-kron-bf16": make(lambda g: weight_builder("kron", g, dtype="bfloat16")),
        "weight-kron-separate-mc": make(
            lambda g: weight_builder("kron", g, datasets=("docs", "code")),
            datasets=two,
            datasets_combined="separate",
            estimator=Estimator(kind="mc", mc_samples=2, seed=0),
        ),
        "lora-diag": make(
            lambda g: lora_builder("diag", g),
            parameterization=LORA,
            kfac_approx=None,
            estimator=Estimator(kind="batch_empirical"),
        ),
        "lora-kron": make(lambda g: lora_builder("kron", g), parameterization=LORA),
        "lora-kron-tridiag": make(lambda g: lora_builder("kron_tridiag", g), parameterization=LORA),
        "weight-diag-lowrank": make(lambda g: weight_builder("diag_lowrank", g), kfac_approx=None),
        "lora-diag-lowrank": make(lambda g: lora_builder("diag_lowrank", g), parameterization=LORA, kfac_approx=None),
        "merged-kron": merged_vector,
    }


def merged_vector() -> Artifact:
    """A prior (task 0) and the curvature after task 1, merged with decay 0.5."""
    prior = weight_builder("kron", torch.Generator().manual_seed(0)).build(**minimal_fields(software=SOFTWARE))
    task = DatasetInfo(name="task-1", sequences=4, tokens=64, batches=1)
    after = BaseModelInfo(repo_id="example/model-task-1", revision="0" * 40)
    new = weight_builder("kron", torch.Generator().manual_seed(1)).build(
        **minimal_fields(software=SOFTWARE, datasets=[task], base_model=after)
    )
    merged = merge(prior, new, decay=0.5, sources=("example/model@main:laplace", "./task-1-curvature"))
    return Artifact(merged.manifest.model_copy(update={"software": SOFTWARE}), merged.tensor)


def write_valid(out: Path) -> dict[str, Path]:
    """Every valid vector under ``out/<spec_version>/valid``; returns name → folder."""
    folders = {}
    for name, make in valid_vectors().items():
        artifact = make()
        folders[name] = out / artifact.manifest.spec_version / "valid" / name  # type: ignore[attr-defined]
        artifact.save(folders[name], overwrite=True)  # type: ignore[attr-defined]
    sharded = folders["weight-kron"].with_name("weight-kron-sharded")
    valid_vectors()["weight-kron"]().save(sharded, max_shard_bytes=100, overwrite=True)  # type: ignore[attr-defined]
    folders["weight-kron-sharded"] = sharded
    newer = _copy(folders["weight-diag-lowrank"], "newer-minor-1.2")
    _edit_manifest(newer, lambda m: m.update(spec_version="1.2", future_field={"added_in": "1.2"}))
    return folders


# --- breaking a valid vector in one way -------------------------------------------------------


def _copy(source: Path, name: str, kind: str = "valid") -> Path:
    target = source.parent.parent / kind / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def _edit_manifest(folder: Path, edit: Callable[[dict], object]) -> None:
    manifest = json.loads((folder / "laplace.json").read_text())
    edit(manifest)
    (folder / "laplace.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _edit_tensors(
    folder: Path, edit: Callable[[dict[str, torch.Tensor]], object], name: str = "laplace.safetensors"
) -> None:
    tensors = load_file(folder / name)
    edit(tensors)
    version = json.loads((folder / "laplace.json").read_text())["spec_version"]
    save_file(tensors, folder / name, metadata=tensor_file_metadata(version))
    _refresh_checksum(folder, name)


def _refresh_checksum(folder: Path, name: str) -> None:
    path = folder / name
    _edit_manifest(
        folder, lambda m: m["files"].__setitem__(name, {"size": path.stat().st_size, "sha256": sha256_file(path)})
    )


def _first_key(folder: Path, suffix: str) -> str:
    return next(k for k in load_file(folder / "laplace.safetensors") if k.endswith(suffix))


def _set(tensors: dict[str, torch.Tensor], suffix: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    key = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[key] = fn(tensors[key].clone()).contiguous()


def _flip_byte(folder: Path, name: str, offset: int = -3) -> None:
    data = bytearray((folder / name).read_bytes())
    data[offset] ^= 0xFF
    (folder / name).write_bytes(bytes(data))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = float("nan")
    return t


def _negate_first(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = -1.0
    return t


def _asymmetric(t: torch.Tensor) -> torch.Tensor:
    t[0, 1] += 1.0
    return t


def _write_header_size(folder: Path, size: int) -> None:
    path = folder / "laplace.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", size)
    path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    path = folder / "laplace.safetensors"
    path.write_bytes(path.read_bytes()[:40])


def _escape_shard(folder: Path) -> None:
    index = json.loads((folder / "laplace.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "../../outside.safetensors"
    (folder / "laplace.safetensors.index.json").write_text(json.dumps(index))
    _refresh_checksum(folder, "laplace.safetensors.index.json")


def _drop_shard(folder: Path) -> None:
    first = sorted(folder.glob("laplace-00001-of-*.safetensors"))[0]
    _edit_manifest(folder, lambda m: m["files"].pop(first.name))
    first.unlink()


INVALID: dict[str, tuple[str, str, str, Callable[[Path], object]]] = {
    # name: (source vector, expected code, what is wrong, how to break it)
    "corrupt-json": (
        "weight-kron",
        "manifest.json_invalid",
        "manifest is not JSON",
        lambda f: (f / "laplace.json").write_text('{"format": "laplace-hub", '),
    ),
    "unknown-major": (
        "weight-kron",
        "version.unsupported_major",
        "spec_version 2.0",
        lambda f: _edit_manifest(f, lambda m: m.update(spec_version="2.0")),
    ),
    "schema-error": (
        "weight-kron",
        "manifest.schema",
        "estimator kind not in the spec",
        lambda f: _edit_manifest(f, lambda m: m["estimator"].update(kind="fisher")),
    ),
    "unknown-field-same-minor": (
        "weight-kron",
        "manifest.unknown_field",
        "a 1.0 manifest with an unknown field",
        lambda f: _edit_manifest(f, lambda m: m.update(surprise=1)),
    ),
    "missing-manifest": ("weight-kron", "manifest.missing", "no laplace.json", lambda f: (f / "laplace.json").unlink()),
    "missing-tensor": (
        "weight-kron",
        "tensor.missing",
        "a referenced tensor is not stored",
        lambda f: _edit_tensors(f, lambda t: t.pop(_first_key(f, ".output"))),
    ),
    "unreferenced-tensor": (
        "weight-kron",
        "tensor.unreferenced",
        "a tensor no block references",
        lambda f: _edit_tensors(f, lambda t: t.update(extra=torch.zeros(2))),
    ),
    "wrong-shape": (
        "weight-kron",
        "tensor.shape",
        "module shape disagrees with the factors",
        lambda f: _edit_manifest(f, lambda m: m["modules"]["model.layers.0.self_attn.k_proj"].update(shape=[3, 4])),
    ),
    "wrong-dtype": (
        "weight-kron",
        "tensor.dtype",
        "manifest says float64, tensors are float32",
        lambda f: _edit_manifest(f, lambda m: m.update(dtype="float64")),
    ),
    "nan": (
        "weight-kron",
        "value.non_finite",
        "a factor holds NaN",
        lambda f: _edit_tensors(f, lambda t: _set(t, ".output", _nan)),
    ),
    "negative-diagonal": (
        "weight-diag",
        "value.negative",
        "a diagonal entry is negative",
        lambda f: _edit_tensors(f, lambda t: _set(t, ".diagonal", _negate_first)),
    ),
    "non-symmetric": (
        "weight-kron",
        "value.not_symmetric",
        "a factor is not symmetric",
        lambda f: _edit_tensors(f, lambda t: _set(t, ".output", _asymmetric)),
    ),
    "indefinite": (
        "weight-kron",
        "value.not_psd",
        "a factor has a negative eigenvalue",
        lambda f: _edit_tensors(f, lambda t: _set(t, ".output", lambda x: x - 10 * torch.eye(x.shape[0]))),
    ),
    "checksum-mismatch": (
        "weight-kron",
        "file.checksum",
        "a data byte flipped after the checksum",
        lambda f: _flip_byte(f, "laplace.safetensors"),
    ),
    "absurd-header": (
        "weight-kron",
        "file.bad_safetensors",
        "header claims 2^60 bytes",
        lambda f: _write_header_size(f, 2**60),
    ),
    "truncated": ("weight-kron", "file.bad_safetensors", "file cut after 40 bytes", _truncate),
    "shard-escape": ("weight-kron-sharded", "file.unsafe_path", "index points outside the folder", _escape_shard),
    "index-missing-shard": (
        "weight-kron-sharded",
        "index.missing_shard",
        "index names a shard that is not listed",
        _drop_shard,
    ),
    "stray-file": (
        "weight-kron",
        "file.stray",
        "an extra file in the folder",
        lambda f: (f / "notes.bin").write_bytes(b"\x00" * 8),
    ),
    "lora-init-missing": (
        "lora-kron",
        "lora.init_missing",
        "lora artifact without init tensors",
        lambda f: _edit_manifest(f, lambda m: [e.pop("lora_init") for e in m["modules"].values()]),
    ),
    "counts-inconsistent": (
        "weight-kron",
        "counts.inconsistent",
        "fewer tokens than sequences",
        lambda f: _edit_manifest(f, lambda m: m["datasets"][0].update(tokens=2)),
    ),
    # spec 1.1: versioned features and merged posteriors
    "newer-feature-old-version": (
        "weight-diag-lowrank",
        "manifest.newer_feature",
        "a diag_lowrank block in a manifest that says 1.0",
        lambda f: _edit_manifest(f, lambda m: m.update(spec_version="1.0")),
    ),
    "unknown-structure-newer-minor": (
        "weight-diag-lowrank",
        "manifest.unsupported_structure",
        "a 1.2 manifest with a structure this reader does not know",
        lambda f: _edit_manifest(f, _future_structure),
    ),
    "lowrank-wrong-rank": (
        "weight-diag-lowrank",
        "tensor.shape",
        "a diag_lowrank block says rank 3 but stores 2 directions",
        lambda f: _edit_manifest(
            f, lambda m: m["modules"]["model.layers.0.self_attn.k_proj"]["blocks"][0].update(rank=3)
        ),
    ),
    "lineage-incomplete": (
        "merged-kron",
        "manifest.lineage",
        "a dataset of a merged posterior that no lineage entry names",
        lambda f: _edit_manifest(
            f, lambda m: m["lineage"][0]["datasets"].clear() or m["lineage"][0]["datasets"].append("x")
        ),
    ),
}


def _future_structure(manifest: dict) -> None:
    manifest["spec_version"] = "1.2"
    block = next(iter(manifest["modules"].values()))["blocks"][0]
    block["structure"] = "future_structure"


def write_invalid(valid: dict[str, Path]) -> None:
    for name, (source, code, what, breaker) in INVALID.items():
        folder = _copy(valid[source], name, "invalid")
        breaker(folder)
        folder.with_name(f"{name}.expected.json").write_text(
            json.dumps({"code": code, "what": what, "from": source}, indent=2) + "\n"
        )


def write_schema() -> None:
    SCHEMA.write_text(json.dumps(manifest_json_schema(), indent=2, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schema", action="store_true", help="only regenerate the JSON Schema")
    parser.add_argument("--out", type=Path, help="write the vectors here instead of spec/conformance (no schema)")
    args = parser.parse_args()
    if args.out is None:
        write_schema()
    if not args.schema:
        out = args.out or OUT
        shutil.rmtree(out, ignore_errors=True)
        write_invalid(write_valid(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
