"""Write the conformance vectors and the JSON Schema of the current spec (run from the repository root).

    python spec/make_conformance.py            # regenerate both
    python spec/make_conformance.py --schema   # only the schema (what the staleness test checks)
    python spec/make_conformance.py --out DIR  # vectors into DIR (the reproducibility test)

Vectors live under ``conformance/<spec_version>/``: a vector goes to the lowest version able to
hold it, since writers write that version. The 1.0 and 1.1 vectors are therefore still written by
this script and must come out byte for byte as committed: a test regenerates them. Valid vectors
cover every structure and parameterization; each invalid vector is a valid one broken in one way,
with ``expected.json`` naming the finding code the validator must report.

Spec 1.2 adds no manifest feature, only rules (every accepted artifact is safe to train with) and
finding codes. Its invalid vectors (``conformance/1.2/invalid``) are 1.0 and 1.1 valid vectors,
copied with their old ``spec_version``, that break one 1.2 rule: a 1.2 reader must refuse them with
the new code, and with that code only. Every finding code has an invalid vector except three, which
no folder in git can trigger: ``model.module_missing`` and ``model.shape`` need a base model to
compare with, and ``file.unreadable`` needs an OS error on read (permissions do not stop root).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from laplace_hub.artifact import Artifact, ArtifactBuilder, merge, minimal_fields
from laplace_hub.artifact.files import sha256_file
from laplace_hub.curvature import DenseFactor, DiagBlock, DiagLowRankBlock, KronBlock, WeightBlock
from laplace_hub.fingerprint import fingerprint_weights, root_digest
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
        # 1.3: a fingerprint per module, of the weights BASE_WEIGHTS generates
        "weight-kron-fingerprinted": make(
            lambda g: weight_builder("kron", g),
            base_model=BaseModelInfo(repo_id="example/model", fingerprint=fingerprint_weights(base_weights())),
        ),
    }


def base_weights() -> dict[str, torch.Tensor]:
    """The base model the fingerprinted vector was computed at: ``W`` of each module, seed 7, float32."""
    gen = torch.Generator().manual_seed(7)
    return {name: torch.randn(*shape, generator=gen) for name, shape in SHAPES.items()}


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
    # 1.2 writes no manifest a 1.1 writer could not: its only valid vector is the next minor's
    newer = _copy(folders["weight-diag-lowrank"], "newer-minor-1.3", version=out / "1.2")
    _edit_manifest(newer, lambda m: m.update(spec_version="1.3", future_field={"added_in": "1.3"}))
    newer = _copy(folders["weight-kron-fingerprinted"], "newer-minor-1.4")
    _edit_manifest(newer, lambda m: m.update(spec_version="1.4", future_field={"added_in": "1.4"}))
    return folders


# --- breaking a valid vector in one way -------------------------------------------------------


def _copy(source: Path, name: str, kind: str = "valid", version: Path | None = None) -> Path:
    """Copy a vector to ``<version>/<kind>/<name>``; by default under the source's own version."""
    target = (version or source.parent.parent) / kind / name
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
        lambda f: _edit_manifest(f, _future_structure("1.2")),
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


def _future_structure(version: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["spec_version"] = version
        block = next(iter(manifest["modules"].values()))["blocks"][0]
        block["structure"] = "future_structure"

    return edit


# --- spec 1.2: rules that make every accepted artifact safe to train with ----------------------


def _split_safetensors(folder: Path, name: str = "laplace.safetensors") -> tuple[dict[str, Any], bytes]:
    """A tensor file's header (``__metadata__`` included, in file order) and its data buffer."""
    data = (folder / name).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _write_safetensors(folder: Path, header: str, body: bytes, name: str = "laplace.safetensors") -> None:
    """Write a header text (padded with spaces to 8 bytes, as safetensors does) and a data buffer."""
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    (folder / name).write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    _refresh_checksum(folder, name)


def _edit_header(folder: Path, edit: Callable[[dict[str, Any], bytes], bytes]) -> None:
    """Let ``edit`` change the parsed header in place and return the new data buffer."""
    header, body = _split_safetensors(folder)
    body = edit(header, body)
    _write_safetensors(folder, json.dumps(header, separators=(",", ":")), body)


def _last_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return max((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])


def _first_entry(header: dict[str, Any]) -> dict[str, Any]:
    return header[min(k for k in header if k != "__metadata__")]


def _hole(header: dict[str, Any], body: bytes) -> bytes:
    """8 zero bytes before the last tensor, whose offsets move past them."""
    last = _last_tensor(header)
    start = last["data_offsets"][0]
    last["data_offsets"] = [o + 8 for o in last["data_offsets"]]
    return body[:start] + b"\x00" * 8 + body[start:]


def _overlap(header: dict[str, Any], body: bytes) -> bytes:
    """The last tensor starts 4 bytes early, over the end of the one before it."""
    last = _last_tensor(header)
    start = last["data_offsets"][0]
    last["data_offsets"] = [o - 4 for o in last["data_offsets"]]
    return body[: start - 4] + body[start:]


def _duplicate_header_key(folder: Path) -> None:
    header, body = _split_safetensors(folder)
    key = min(k for k in header if k != "__metadata__")
    text = json.dumps(header, separators=(",", ":"))
    _write_safetensors(folder, "{" + json.dumps(key) + ":" + json.dumps(header[key]) + "," + text[1:], body)


def _edit_manifest_text(folder: Path, old: str, new: str) -> None:
    text = (folder / "laplace.json").read_text()
    assert old in text, old
    (folder / "laplace.json").write_text(text.replace(old, new, 1))


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def _rename_module(manifest: dict[str, Any], old: str, new: str) -> None:
    manifest["modules"] = {new if k == old else k: v for k, v in manifest["modules"].items()}


def _indefinite_by(fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Shift a factor down so that its least eigenvalue is ``-fraction × ‖F‖_F`` (in float64)."""

    def shift(t: torch.Tensor) -> torch.Tensor:
        f = t.double()
        least = torch.linalg.eigvalsh(f)[0].item()
        down = least + fraction * torch.linalg.matrix_norm(f).item()
        return (f - down * torch.eye(f.shape[0], dtype=torch.float64)).to(t.dtype)

    return shift


def _reverse_eigenpairs(tensors: dict[str, torch.Tensor]) -> None:
    _set(tensors, "q_proj.weight.all.output.eigenvalues", lambda t: t.flip(0))
    _set(tensors, "q_proj.weight.all.output.eigenvectors", lambda t: t.flip(1))


def _tail_above(folder: Path) -> None:
    top = load_file(folder / "laplace.safetensors")[_first_key(folder, "q_proj.weight.all.output.eigenvalues")]
    module = "model.layers.0.self_attn.q_proj"
    _edit_manifest(folder, lambda m: m["modules"][module]["blocks"][0]["output"].update(tail=2 * top.max().item()))


def _scale_cross(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if k.endswith(".cross_output")]:
        tensors[key] = tensors[key] * 10


def _file_for_folder(folder: Path) -> None:
    """The artifact path names a regular file (the manifest alone) instead of a folder."""
    manifest = (folder / "laplace.json").read_bytes()
    shutil.rmtree(folder)
    folder.write_bytes(manifest)


def _symlink_tensors(folder: Path) -> None:
    """The tensor file is a link to a hidden sibling holding the very bytes the manifest lists."""
    (folder / "laplace.safetensors").rename(folder / ".data")
    (folder / "laplace.safetensors").symlink_to(".data")


def _set_file_format(folder: Path, value: str) -> None:
    save_file(load_file(folder / "laplace.safetensors"), folder / "laplace.safetensors", metadata={"format": value})
    _refresh_checksum(folder, "laplace.safetensors")


def _add_unindexed_file(folder: Path) -> None:
    version = json.loads((folder / "laplace.json").read_text())["spec_version"]
    save_file({}, folder / "laplace.safetensors", metadata=tensor_file_metadata(version))
    _refresh_checksum(folder, "laplace.safetensors")


def _as_lone_shard(folder: Path) -> None:
    """The single tensor file renamed to a shard's name, with no index beside it."""
    shard = "laplace-00001-of-00001.safetensors"
    (folder / "laplace.safetensors").rename(folder / shard)
    _edit_manifest(folder, lambda m: m.update(files={shard: m["files"].pop("laplace.safetensors")}))


def _edit_index(folder: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = folder / "laplace.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index, indent=2) + "\n")
    _refresh_checksum(folder, "laplace.safetensors.index.json")


def _unindex(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"].pop("laplace.safetensors.index.json"))
    (folder / "laplace.safetensors.index.json").unlink()


def _wrong_shard(index: dict[str, Any]) -> None:
    weight_map = index["weight_map"]
    key = sorted(weight_map)[0]
    others = sorted(set(weight_map.values()) - {weight_map[key]})
    weight_map[key] = others[0]


def _copy_into_second_shard(folder: Path) -> None:
    """A tensor of the first shard stored in the second too (the index still names the first)."""
    index = json.loads((folder / "laplace.safetensors.index.json").read_text())
    key = sorted(k for k, s in index["weight_map"].items() if s.startswith("laplace-00001"))[0]
    tensor = load_file(folder / index["weight_map"][key])[key]
    _edit_tensors(folder, lambda t: t.update({key: tensor}), name="laplace-00002-of-00002.safetensors")


def _append_byte(folder: Path, name: str) -> None:
    with (folder / name).open("ab") as f:
        f.write(b"\n")


Q_PROJ = "model.layers.0.self_attn.q_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"

INVALID_1_2: dict[str, tuple[str, str, str, Callable[[Path], object]]] = {
    # files: nothing but regular files is opened, nothing is hashed above the byte budget
    "symlinked-tensor-file": (
        "weight-kron",
        "file.not_regular",
        "laplace.safetensors is a symbolic link to a hidden sibling holding the listed bytes",
        _symlink_tensors,
    ),
    "over-budget": (
        "weight-kron",
        "file.budget",
        "the manifest declares a 300 GiB tensor file, above the default budget of 256 GiB",
        lambda f: _edit_manifest(f, lambda m: m["files"]["laplace.safetensors"].update(size=300 * 2**30)),
    ),
    # safetensors: tensors tile the data buffer exactly, entries are strict
    "trailing-bytes": (
        "weight-kron",
        "file.bad_safetensors",
        "8 bytes after the last tensor",
        lambda f: _edit_header(f, lambda h, body: body + b"\x00" * 8),
    ),
    "hole-between-tensors": (
        "weight-kron",
        "file.bad_safetensors",
        "8 unused bytes before the last tensor",
        lambda f: _edit_header(f, _hole),
    ),
    "overlapping-tensors": (
        "weight-kron",
        "file.bad_safetensors",
        "the last tensor starts 4 bytes inside the one before it",
        lambda f: _edit_header(f, _overlap),
    ),
    "shape-true": (
        "weight-kron",
        "file.bad_safetensors",
        "a shape entry is true, not an integer",
        lambda f: _edit_header(f, lambda h, body: _first_entry(h)["shape"].__setitem__(0, True) or body),
    ),
    "dtype-not-string": (
        "weight-kron",
        "file.bad_safetensors",
        'a tensor entry has "dtype": {}',
        lambda f: _edit_header(f, lambda h, body: _first_entry(h).update(dtype={}) or body),
    ),
    "duplicate-header-key": (
        "weight-kron",
        "file.bad_safetensors",
        "a tensor key appears twice in the safetensors header",
        _duplicate_header_key,
    ),
    "extra-entry-key": (
        "weight-kron",
        "file.bad_safetensors",
        "a tensor entry has a key besides dtype, shape and data_offsets",
        lambda f: _edit_header(f, lambda h, body: _first_entry(h).update(layout="row_major") or body),
    ),
    "two-metadata-keys": (
        "weight-kron",
        "file.metadata",
        "safetensors metadata holds a second key besides format",
        lambda f: _edit_header(f, lambda h, body: h["__metadata__"].update(note="extra") or body),
    ),
    # manifest JSON: bounded, and one meaning only
    "deep-nesting": (
        "weight-kron",
        "manifest.json_invalid",
        "software holds lists nested 40 deep (at most 32 levels)",
        lambda f: _edit_manifest(f, lambda m: m["software"].update(nested=_nested(40))),
    ),
    "huge-integer": (
        "weight-kron",
        "manifest.json_invalid",
        "a 5000-digit integer (at most 24 digits)",
        lambda f: _edit_manifest_text(f, '"tokens": 128', '"tokens": 1' + "0" * 4999),
    ),
    "float-overflow": (
        "weight-kron",
        "manifest.json_invalid",
        "a number (1e999) that overflows a float64",
        lambda f: _edit_manifest_text(f, '"weight": 1.0', '"weight": 1e999'),
    ),
    "nan-literal": (
        "weight-kron",
        "manifest.json_invalid",
        "a dataset weight written NaN (not JSON)",
        lambda f: _edit_manifest_text(f, '"weight": 1.0', '"weight": NaN'),
    ),
    "duplicate-manifest-key": (
        "weight-kron",
        "manifest.json_invalid",
        "dtype appears twice in the manifest object",
        lambda f: _edit_manifest_text(f, '"dtype": "float32",', '"dtype": "float32",\n  "dtype": "float32",'),
    ),
    "lone-surrogate": (
        "weight-kron",
        "manifest.json_invalid",
        "a module name holds the lone UTF-16 surrogate \\ud800",
        lambda f: _edit_manifest(f, lambda m: _rename_module(m, K_PROJ, K_PROJ + "\ud800")),
    ),
    # manifest rules
    "dataset-weight-too-large": (
        "weight-kron-separate-mc",
        "manifest.schema",
        "a separate dataset has weight 1e300 (at most 2^16)",
        lambda f: _edit_manifest(f, lambda m: m["datasets"][1].update(weight=1e300)),
    ),
    "summed-weight-not-one": (
        "weight-kron",
        "manifest.datasets",
        "a single summed dataset with weight 5",
        lambda f: _edit_manifest(f, lambda m: m["datasets"][0].update(weight=5.0)),
    ),
    # values
    "value-too-large": (
        "weight-kron",
        "value.range",
        "a factor scaled by 1e13 (values above 2^40)",
        lambda f: _edit_tensors(f, lambda t: _set(t, ".output", lambda x: x * 1e13)),
    ),
    "eigenvalues-increasing": (
        "weight-kron-eig",
        "value.eigen_order",
        "an eigen factor's eigenpairs stored smallest first",
        lambda f: _edit_tensors(f, _reverse_eigenpairs),
    ),
    "tail-above-eigenvalues": (
        "weight-kron-eig",
        "value.eigen_order",
        "an eigen factor's tail is twice its largest kept eigenvalue",
        _tail_above,
    ),
    "eigenvectors-scaled": (
        "weight-kron-eig",
        "value.not_orthonormal",
        "an eigen factor's eigenvectors scaled by 1.5",
        lambda f: _edit_tensors(f, lambda t: _set(t, "q_proj.weight.all.output.eigenvectors", lambda x: x * 1.5)),
    ),
    "bf16-indefinite": (
        "weight-kron-bf16",
        "value.not_psd",
        "a bfloat16 factor whose least eigenvalue is -1% of its Frobenius norm (beyond the bfloat16 margin)",
        lambda f: _edit_tensors(f, lambda t: _set(t, "q_proj.weight.all.output", _indefinite_by(0.01))),
    ),
    "tridiag-cross-too-large": (
        "lora-kron-tridiag",
        "value.not_psd",
        "kron_tridiag cross blocks scaled by 10: each LoRA pair's block is indefinite",
        lambda f: _edit_tensors(f, _scale_cross),
    ),
    # the codes no 1.0 or 1.1 vector gave
    "file-not-folder": (
        "weight-kron",
        "artifact.not_found",
        "the artifact path is a regular file (a manifest), not a folder",
        _file_for_folder,
    ),
    "mc-without-samples": (
        "weight-kron-separate-mc",
        "manifest.estimator",
        "estimator mc without mc_samples",
        lambda f: _edit_manifest(f, lambda m: m["estimator"].update(mc_samples=None)),
    ),
    "kron-without-kfac-approx": (
        "weight-kron",
        "manifest.kfac_approx",
        "Kronecker blocks with kfac_approx null",
        lambda f: _edit_manifest(f, lambda m: m.update(kfac_approx=None)),
    ),
    "duplicate-dataset-name": (
        "weight-kron-separate-mc",
        "manifest.datasets",
        "two datasets named docs",
        lambda f: _edit_manifest(f, lambda m: m["datasets"][1].update(name="docs")),
    ),
    "weight-block-param-lora-a": (
        "weight-kron",
        "manifest.param",
        "a weight artifact's block says param lora_A",
        lambda f: _edit_manifest(f, lambda m: m["modules"][K_PROJ]["blocks"][0].update(param="lora_A")),
    ),
    "tensor-key-conflict": (
        "weight-kron",
        "manifest.tensor_conflict",
        "one tensor key is a 6x6 factor in one module and a 2x2 factor in another",
        lambda f: _edit_manifest(
            f, lambda m: m["modules"][K_PROJ]["blocks"][0]["output"].update(key=f"{Q_PROJ}.weight.all.output")
        ),
    ),
    "listed-file-deleted": (
        "weight-kron",
        "file.missing",
        "the listed laplace.safetensors is not in the folder",
        lambda f: (f / "laplace.safetensors").unlink(),
    ),
    "size-mismatch": (
        "weight-kron-sharded",
        "file.size",
        "a byte appended to the index, its size and checksum entry left as they were",
        lambda f: _append_byte(f, "laplace.safetensors.index.json"),
    ),
    "sharded-without-index": (
        "weight-kron-sharded",
        "index.missing",
        "two shards and no index (neither listed nor present)",
        _unindex,
    ),
    "index-without-weight-map": (
        "weight-kron-sharded",
        "index.invalid",
        "the index has no weight_map",
        lambda f: _edit_index(f, lambda i: i.pop("weight_map")),
    ),
    "index-wrong-shard": (
        "weight-kron-sharded",
        "index.inconsistent",
        "the index maps a tensor to the other shard",
        lambda f: _edit_index(f, _wrong_shard),
    ),
    "tensor-in-two-shards": (
        "weight-kron-sharded",
        "index.inconsistent",
        "a tensor stored in both shards (the index names only the first)",
        _copy_into_second_shard,
    ),
    # the next minor, as the 1.1 vector did for 1.2
    "unknown-structure-newer-minor-1.3": (
        "weight-diag-lowrank",
        "manifest.unsupported_structure",
        "a 1.3 manifest with a structure this reader does not know",
        lambda f: _edit_manifest(f, _future_structure("1.3")),
    ),
}


def _fingerprint_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    return lambda f: _edit_manifest(f, lambda m: edit(m["base_model"]["fingerprint"]))


INVALID_1_3: dict[str, tuple[str, str, str, Callable[[Path], object]]] = {
    "fingerprint-wrong-root": (
        "weight-kron-fingerprinted",
        "manifest.fingerprint",
        "the v2 fingerprint's value is not the digest of its modules' digests",
        _fingerprint_edit(lambda fp: fp.update(value="0" * 64)),
    ),
    "fingerprint-module-missing": (
        "weight-kron-fingerprinted",
        "manifest.fingerprint",
        "the v2 fingerprint lists one module fewer than the manifest (value recomputed)",
        _fingerprint_edit(lambda fp: fp["modules"].pop(K_PROJ) and fp.update(value=root_digest(fp["modules"]))),
    ),
    "fingerprint-v1-with-modules": (
        "weight-kron-fingerprinted",
        "manifest.fingerprint",
        "a sha256-f32-v1 fingerprint that lists module digests",
        _fingerprint_edit(lambda fp: fp.update(algorithm="sha256-f32-v1")),
    ),
    "fingerprint-v2-in-1.2": (
        "weight-kron-fingerprinted",
        "manifest.newer_feature",
        "a sha256-f32-v2 fingerprint in a manifest that says 1.2",
        lambda f: _edit_manifest(f, lambda m: m.update(spec_version="1.2")),
    ),
    "module-name-control-character": (
        "weight-kron-fingerprinted",
        "manifest.schema",
        "a module name holding U+0000 (names are 1–512 characters, no control character)",
        lambda f: _edit_manifest(f, lambda m: _rename_module(m, K_PROJ, K_PROJ + "\x00")),
    ),
    "version-leading-zero": (
        "weight-kron-fingerprinted",
        "manifest.schema",
        'spec_version "1.03" (MAJOR and MINOR are decimal integers without leading zeros)',
        lambda f: _edit_manifest(f, lambda m: m.update(spec_version="1.03")),
    ),
    "factor-side-too-large": (
        "weight-kron-fingerprinted",
        "manifest.factor_side",
        "a kron module of shape [40000, 4]: a dense output factor of side 40000 (at most 32768)",
        lambda f: _edit_manifest(f, lambda m: m["modules"][K_PROJ].update(shape=[40000, 4])),
    ),
    "integer-above-int64": (
        "weight-kron-fingerprinted",
        "manifest.schema",
        "a dataset's tokens is 2^63, one above the largest signed 64-bit integer",
        lambda f: _edit_manifest(f, lambda m: m["datasets"][0].update(tokens=2**63)),
    ),
    "lone-shard-without-index": (
        "weight-kron-fingerprinted",
        "index.missing",
        "the one tensor file is named laplace-00001-of-00001.safetensors and there is no index",
        _as_lone_shard,
    ),
    "card-is-a-folder": (
        "weight-kron-fingerprinted",
        "file.not_regular",
        "README.md is a folder (a model card must be a regular file, never a link or a folder)",
        lambda f: (f / "README.md").mkdir() or (f / "README.md" / "card.md").write_text("a card\n"),
    ),
    "metadata-version-leading-zero": (
        "weight-kron-fingerprinted",
        "file.metadata",
        'the tensor file\'s metadata says "laplace-hub/1.03" (the version syntax of §10 has no leading zero)',
        lambda f: _set_file_format(f, "laplace-hub/1.03"),
    ),
    "tensor-file-the-index-does-not-name": (
        "weight-kron-sharded",
        "index.inconsistent",
        "an empty laplace.safetensors listed beside the shards, which the index does not name",
        _add_unindexed_file,
    ),
    "unknown-structure-newer-minor-1.4": (
        "weight-kron-fingerprinted",
        "manifest.unsupported_structure",
        "a 1.4 manifest with a structure this reader does not know",
        lambda f: _edit_manifest(f, _future_structure("1.4")),
    ),
}


# Findings a validator also reports after these vectors' own (§8.4, §12): shapes follow from a refused module.
FOLLOW_ONS = {"factor-side-too-large": ["tensor.shape"]}


def write_invalid(valid: dict[str, Path], out: Path) -> None:
    for vectors, version in ((INVALID, None), (INVALID_1_2, out / "1.2"), (INVALID_1_3, out / "1.3")):
        for name, (source, code, what, breaker) in vectors.items():
            folder = _copy(valid[source], name, "invalid", version)
            breaker(folder)
            expected = {"code": code, "what": what, "from": source}
            if name in FOLLOW_ONS:
                expected["follow_ons"] = FOLLOW_ONS[name]  # type: ignore[assignment]
            folder.with_name(f"{name}.expected.json").write_text(json.dumps(expected, indent=2) + "\n")


# --- expected penalties: a second, dense reading of SPEC.md §4–§5 and §8.3 -----------------------

PENALTIES = "penalties-{version}.json"


def _raw(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor, read straight from the safetensors files, in float64."""
    return {k: v.double() for f in sorted(folder.glob("laplace*.safetensors")) for k, v in load_file(f).items()}


def _psd(matrix: torch.Tensor) -> torch.Tensor:
    """§8.3: the symmetric part, its negative eigenvalues set to 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0)) @ vectors.T


def _factor(ref: dict[str, Any], n: int, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    if "eigenvalues" in ref:  # F = V diag(max(λ, t) − t) Vᵀ + t·I
        v, tail = raw[ref["eigenvectors"]], ref["tail"]
        return v @ torch.diag(raw[ref["eigenvalues"]].clamp_min(tail) - tail) @ v.T + tail * torch.eye(
            n, dtype=torch.float64
        )
    stored = raw[ref["key"]]
    if ref.get("packed"):
        rows, cols = torch.triu_indices(n, n)
        full = torch.zeros(n, n, dtype=torch.float64)
        full[rows, cols] = stored
        full[cols, rows] = stored
        stored = full
    return _psd(stored)


def _dense(block: dict[str, Any], m: int, n: int, r: int, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """``P`` of one block over the row-major vec of its param (``m × n``), or of ``(δA, δB)`` for ``lora_AB``."""
    kind = block["structure"]
    if kind == "diag":
        return torch.diag(raw[block["diagonal"]].reshape(-1))
    if kind == "diag_lowrank":
        u = raw[block["lowrank"]].reshape(block["rank"], -1)
        return torch.diag(raw[block["diagonal"]].reshape(-1)) + u.T @ u
    if kind in ("kron", "kron_eig"):
        return torch.kron(_factor(block["output"], m, raw), _factor(block["input"], n, raw))
    d_out, d_in = m, n  # kron_tridiag over (vec δA, vec δB)
    sides = {"a_output": r, "a_input": d_in, "b_output": d_out, "b_input": r}
    f = {role: _factor(block[role], side, raw) for role, side in sides.items()}
    a, b = torch.kron(f["a_output"], f["a_input"]), torch.kron(f["b_output"], f["b_input"])
    right, left = raw[block["cross_output"]], raw[block["cross_input"]]
    c = _cross_norm(f, right, left)
    cross = torch.kron(right / c if c > 1 else right, left)  # §8.3: R / c when rounding put c above 1
    return torch.cat([torch.cat([a, cross], 1), torch.cat([cross.T, b], 1)], 0)


def _cross_norm(f: dict[str, torch.Tensor], right: torch.Tensor, left: torch.Tensor) -> float:
    """§8.2's ``c = ‖Aₒ^{-½} R Bₒ^{-½}‖₂ · ‖Aᵢ^{-½} L Bᵢ^{-½}‖₂``, with ``X^{-½} = L_X⁻¹`` (Cholesky)."""

    def side(first: torch.Tensor, second: torch.Tensor, cross: torch.Tensor) -> float:
        if not bool(cross.any()):
            return 0.0
        inv_first, inv_second = (torch.linalg.inv(torch.linalg.cholesky(x)) for x in (first, second))
        return float(torch.linalg.matrix_norm(inv_first @ cross @ inv_second.T, ord=2))

    return side(f["a_output"], f["b_output"], right) * side(f["a_input"], f["b_input"], left)


def _module_precision(manifest: dict[str, Any], module: dict[str, Any], raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """§5: ``P`` of a module over ``vec(Δ)`` (weight) or ``(vec δA, vec δB)`` (lora), datasets weighted."""
    d_out, d_in = module["shape"]
    r = manifest["parameterization"].get("rank", 0)
    sides = {"weight": (d_out, d_in), "lora_A": (r, d_in), "lora_B": (d_out, r), "lora_AB": (d_out, d_in)}
    weights = {d["name"]: d.get("weight", 1.0) for d in manifest["datasets"]}
    size = d_out * d_in if manifest["parameterization"]["kind"] == "weight" else r * (d_in + d_out)
    total = torch.zeros(size, size, dtype=torch.float64)
    for block in module["blocks"]:
        dense = _dense(block, *sides[block["param"]], r, raw) * weights.get(block["dataset"], 1.0)
        start = r * d_in if block["param"] == "lora_B" else 0
        total[start : start + dense.shape[0], start : start + dense.shape[0]] += dense
    return total


def expected_penalties(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Two updates per module (eighths, exact in JSON) and ``vec(Δ)ᵀ P vec(Δ)`` from the raw numbers."""
    manifest, raw = json.loads((folder / "laplace.json").read_text()), _raw(folder)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, module in sorted(manifest["modules"].items()):
        d_out, d_in = module["shape"]
        shapes = [(d_out, d_in)]
        if manifest["parameterization"]["kind"] == "lora":
            r = manifest["parameterization"]["rank"]
            shapes = [(r, d_in), (d_out, r)]
        precision = _module_precision(manifest, module, raw)
        out[name] = []
        for _ in range(2):
            deltas = [torch.randint(-16, 17, s, generator=gen).double() / 8 for s in shapes]
            flat = torch.cat([d.reshape(-1) for d in deltas])
            out[name].append({"deltas": [d.tolist() for d in deltas], "penalty": float(flat @ precision @ flat)})
    return out


def write_penalties(out: Path) -> None:
    """``penalties-<SPEC_VERSION>.json``: what a reader of this version returns on every valid vector."""
    vectors = sorted(p for p in out.glob("*/valid/*") if p.is_dir() and not p.name.startswith("newer-minor"))
    table = {p.relative_to(out).as_posix(): expected_penalties(p) for p in vectors}
    (out / PENALTIES.format(version=SPEC_VERSION)).write_text(json.dumps(table, indent=1) + "\n")


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
        write_invalid(write_valid(out), out)
        write_penalties(out)
        for path in out.rglob("*"):  # safetensors writes 0600 files; a vector must be readable by anyone
            if path.is_file() and not path.is_symlink():
                path.chmod(0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
