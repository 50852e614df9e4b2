"""The manifest (``laplace.json``): pydantic models that are the single source of truth of the spec.

The JSON Schema in ``spec/`` is generated from these models (:func:`manifest_json_schema`), and
:func:`expected_tensors` is the one place that knows which tensor a manifest implies, with which
shape: the writer, the reader and the validator all ask it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic import ValidationError as _PydanticValidationError

from laplace_hub.errors import ManifestError, UnsupportedVersionError

__all__ = [
    "CARD_NAME",
    "FORMAT_NAME",
    "INDEX_NAME",
    "INTRODUCED_IN",
    "MANIFEST_NAME",
    "SINGLE_FILE_NAME",
    "SPEC_VERSION",
    "BaseModelInfo",
    "DType",
    "DatasetInfo",
    "DiagBlockEntry",
    "DiagLowRankBlockEntry",
    "EigenFactorRef",
    "Estimator",
    "EstimatorKind",
    "FactorRef",
    "FileEntry",
    "Fingerprint",
    "KfacApprox",
    "KronBlockEntry",
    "KronEigBlockEntry",
    "KronTridiagBlockEntry",
    "LineageEntry",
    "LoraInitRef",
    "LoraParameterization",
    "Manifest",
    "ModuleEntry",
    "Normalization",
    "TensorSpec",
    "WeightParameterization",
    "expected_tensors",
    "features",
    "manifest_json",
    "manifest_json_schema",
    "parse_manifest",
    "required_version",
]

FORMAT_NAME: Literal["laplace-hub"] = "laplace-hub"
"""The manifest's ``format`` field, and the prefix of every tensor file's ``format`` metadata."""
SPEC_VERSION = "1.3"
"""The newest spec version this package implements; it reads every minor of the same major."""
MANIFEST_NAME = "laplace.json"
"""The manifest's file name in an artifact folder."""
SINGLE_FILE_NAME = "laplace.safetensors"
"""The tensor file of an unsharded artifact."""
INDEX_NAME = "laplace.safetensors.index.json"
"""The index of a sharded artifact: which shard holds which tensor."""
CARD_NAME = "README.md"
"""The optional model card of an artifact folder."""

DType = Literal["float32", "float16", "bfloat16", "float64"]
"""The dtypes an artifact may store its tensors in."""
# The option vocabularies, spelled once: producers, the CLI (typing.get_args) and the sweep use these.
EstimatorKind = Literal["empirical", "mc", "batch_empirical"]
"""How gradients are formed (SPEC.md §6): labels from the data, drawn from the model, or per mini-batch."""
Normalization = Literal["per_sequence", "per_token"]
"""What the curvature is a mean over (SPEC.md §6): source sequences or tokens."""
KfacApprox = Literal["expand", "reduce"]
"""How K-FAC treats the positions of a sequence (SPEC.md §6): each an example, or one mean per sequence."""
MAX_KEY_LENGTH = 512
MIN_DATASET_WEIGHT = 2.0**-16  # a weight is 0 or at least this: smaller ones underflow in float32
MAX_DATASET_WEIGHT = 2.0**16  # with stored values ≤ 2^40, a Kronecker penalty stays within float32 (SPEC.md §8.3)
MAX_DATASET_NAME_LENGTH = 64
TensorKey = Annotated[str, StringConstraints(pattern=rf"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{{0,{MAX_KEY_LENGTH - 1}}}$")]
DATASET_NAME_PATTERN = rf"^[A-Za-z0-9_][A-Za-z0-9_\-]{{0,{MAX_DATASET_NAME_LENGTH - 1}}}$"
DatasetName = Annotated[str, StringConstraints(pattern=DATASET_NAME_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,512}$")]
"""A module's name: 1–512 characters, none a control character (the fingerprint and logs stay unambiguous)."""
MAX_MODULES = 100_000
VERSION_PART = "(?:0|[1-9][0-9]{0,3})"  # MAJOR and MINOR: decimal, at most 4 digits, no leading zero (SPEC.md §10)
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
"""Every manifest integer fits a signed 64-bit integer, so no reader's integer type overflows (SPEC.md §4)."""
PositiveInt = Annotated[int, Field(gt=0, le=INT64_MAX)]
NonNegativeInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
Param = Literal["weight", "lora_A", "lora_B", "lora_AB"]
Role = Literal["diagonal", "lowrank", "factor", "eigenvalues", "eigenvectors", "cross", "init"]
TensorShapes = Iterator[tuple[str, tuple[int, ...], Role]]


class _Model(BaseModel):
    # Unknown fields are kept (a newer minor may add them); `unknown_fields` finds them so
    # that writers can refuse them and readers can warn.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class FactorRef(_Model):
    """A dense square factor, stored full (``n × n``) or packed (upper triangle, row-major)."""

    key: TensorKey
    packed: bool = False


class EigenFactorRef(_Model):
    """A factor kept as its top ``rank`` eigenpairs plus the mean ``tail`` of the others."""

    eigenvalues: TensorKey
    eigenvectors: TensorKey
    rank: PositiveInt
    tail: float = Field(ge=0.0, allow_inf_nan=False)


class _BlockBase(_Model):
    param: Param
    dataset: DatasetName | None = None

    # The spec version that added the structure (SPEC.md §10); see INTRODUCED_IN.
    introduced_in: ClassVar[str] = "1.0"

    def dims(self, shape: list[int] | tuple[int, int], rank: int | None, where: str = "") -> tuple[int, int]:
        """(d_out, d_in) of the matrix the block covers in a module of ``shape``, at LoRA ``rank``."""
        if self.param == "lora_AB":
            raise ManifestError("param 'lora_AB' needs structure kron_tridiag", location=where, code="manifest.param")
        return _param_dims(self.param, shape, rank, where)

    def tensors(self, shape: list[int], rank: int | None, where: str) -> TensorShapes:
        """Every tensor the entry references: its key, the shape the manifest implies, and its role.

        Raises:
            ManifestError: the block does not fit the module or the parameterization.

        """
        yield from self._matrix_tensors(self.dims(shape, rank, where), where)

    def _matrix_tensors(self, dims: tuple[int, int], where: str) -> TensorShapes:
        raise NotImplementedError


class DiagBlockEntry(_BlockBase):
    """Diagonal precision: one value per parameter entry."""

    structure: Literal["diag"]
    diagonal: TensorKey

    def _matrix_tensors(self, dims: tuple[int, int], where: str) -> TensorShapes:
        yield self.diagonal, dims, "diagonal"


class DiagLowRankBlockEntry(_BlockBase):
    """Diagonal plus low-rank precision ``diag(vec D) + Σⱼ vec(Uⱼ) vec(Uⱼ)ᵀ`` (spec 1.1)."""

    structure: Literal["diag_lowrank"]
    diagonal: TensorKey
    lowrank: TensorKey
    rank: PositiveInt

    introduced_in: ClassVar[str] = "1.1"

    def _matrix_tensors(self, dims: tuple[int, int], where: str) -> TensorShapes:
        d_out, d_in = dims
        yield self.diagonal, dims, "diagonal"
        if self.rank > d_out * d_in:
            raise ManifestError(
                f"low rank {self.rank} exceeds the {d_out * d_in} entries it spans", location=where
            )  # manifest.schema: out of range
        yield self.lowrank, (self.rank, d_out, d_in), "lowrank"


class KronBlockEntry(_BlockBase):
    """Kronecker precision ``Σg ⊗ Σx`` over the row-major vec of the parameter."""

    structure: Literal["kron"]
    input: FactorRef
    output: FactorRef

    def _matrix_tensors(self, dims: tuple[int, int], where: str) -> TensorShapes:
        d_out, d_in = dims
        yield self.input.key, _factor_shape(self.input, d_in), "factor"
        yield self.output.key, _factor_shape(self.output, d_out), "factor"


class KronEigBlockEntry(_BlockBase):
    """Kronecker precision whose factors are eigen-truncated."""

    structure: Literal["kron_eig"]
    input: EigenFactorRef
    output: EigenFactorRef

    def _matrix_tensors(self, dims: tuple[int, int], where: str) -> TensorShapes:
        d_out, d_in = dims
        for ref, n in ((self.input, d_in), (self.output, d_out)):
            if ref.rank > n:
                raise ManifestError(f"eigen rank {ref.rank} exceeds dimension {n}", location=where)
            yield ref.eigenvalues, (ref.rank,), "eigenvalues"
            yield ref.eigenvectors, (n, ref.rank), "eigenvectors"


class KronTridiagBlockEntry(_BlockBase):
    """LoRA A/B pair with Kronecker diagonal blocks and a Kronecker cross block (B-Tri-K-FAC)."""

    structure: Literal["kron_tridiag"]
    a_input: FactorRef
    a_output: FactorRef
    b_input: FactorRef
    b_output: FactorRef
    cross_input: TensorKey
    cross_output: TensorKey

    def tensors(self, shape: list[int], rank: int | None, where: str) -> TensorShapes:
        if rank is None:
            raise ManifestError("kron_tridiag needs the lora parameterization", location=where, code="manifest.param")
        d_out, d_in = shape
        yield self.a_input.key, _factor_shape(self.a_input, d_in), "factor"
        yield self.a_output.key, _factor_shape(self.a_output, rank), "factor"
        yield self.b_input.key, _factor_shape(self.b_input, rank), "factor"
        yield self.b_output.key, _factor_shape(self.b_output, d_out), "factor"
        yield self.cross_input, (d_in, rank), "cross"
        yield self.cross_output, (rank, d_out), "cross"


BlockEntry = Annotated[
    DiagBlockEntry | DiagLowRankBlockEntry | KronBlockEntry | KronEigBlockEntry | KronTridiagBlockEntry,
    Field(discriminator="structure"),
]
BLOCK_ENTRIES: tuple[type[_BlockBase], ...] = get_args(get_args(BlockEntry)[0])
# The structure names, in the union's order: each entry model's ``structure`` literal.
STRUCTURES: tuple[str, ...] = tuple(get_args(e.model_fields["structure"].annotation)[0] for e in BLOCK_ENTRIES)


class LoraInitRef(_Model):
    """Keys of the LoRA init tensors ``A₀: r × d_in`` and ``B₀: d_out × r``."""

    lora_A: TensorKey
    lora_B: TensorKey


class ModuleEntry(_Model):
    """One linear module of the base model: ``W`` has shape ``[d_out, d_in]``."""

    shape: list[PositiveInt] = Field(min_length=2, max_length=2)
    blocks: list[BlockEntry] = Field(min_length=1, max_length=1024)
    lora_init: LoraInitRef | None = None


class WeightParameterization(_Model):
    """Curvature over the base weights ``W`` of each module; fits any LoRA rank."""

    kind: Literal["weight"]


class LoraParameterization(_Model):
    """Curvature over LoRA factors at one stored init (the paper's form)."""

    kind: Literal["lora"]
    rank: PositiveInt
    alpha: float = Field(gt=0, allow_inf_nan=False)
    use_rslora: bool = False
    init_method: str = Field(min_length=1, max_length=64)
    init_seed: Int64 | None = None
    init_dtype: DType = "float32"


Parameterization = Annotated[WeightParameterization | LoraParameterization, Field(discriminator="kind")]


class Estimator(_Model):
    """How per-example gradients were formed (labels from data, from the model, or batched)."""

    kind: EstimatorKind
    mc_samples: PositiveInt | None = None
    seed: Int64 | None = None


class DatasetInfo(_Model):
    """A named source dataset and how much of it the curvature saw."""

    name: DatasetName
    sequences: PositiveInt
    tokens: PositiveInt
    batches: PositiveInt
    weight: float = Field(default=1.0, ge=0, le=MAX_DATASET_WEIGHT, allow_inf_nan=False)
    source: str | None = Field(default=None, max_length=1024)
    description: str | None = Field(default=None, max_length=4096)


class Fingerprint(_Model):
    """sha256 over the covered base weights, computed as SPEC.md §7 says.

    ``sha256-f32-v2`` (spec 1.3) also lists one digest per module, so that a fine-tuner whose adapter
    covers any subset of the modules checks exactly those; ``value`` is then the digest of that list.
    """

    algorithm: Literal["sha256-f32-v1", "sha256-f32-v2"]
    value: Sha256
    modules: dict[ModuleName, Sha256] | None = Field(default=None, max_length=MAX_MODULES)


class BaseModelInfo(_Model):
    """Identity of the base model the curvature was computed at."""

    repo_id: str = Field(min_length=1, max_length=256)
    revision: str | None = Field(default=None, max_length=256)
    fingerprint: Fingerprint | None = None


class FileEntry(_Model):
    """Size and sha256 of one file of the artifact."""

    size: NonNegativeInt
    sha256: Sha256


class LineageEntry(_Model):
    """One computed artifact folded into a merged posterior (spec 1.1)."""

    base_model: BaseModelInfo
    datasets: list[DatasetName] = Field(min_length=1, max_length=256)
    decay: float = Field(gt=0, le=1, allow_inf_nan=False)
    manifest_sha256: Sha256
    source: str | None = Field(default=None, max_length=1024)


class Manifest(_Model):
    """The whole ``laplace.json``."""

    format: Literal["laplace-hub"]
    spec_version: Annotated[str, StringConstraints(pattern=rf"^{VERSION_PART}\.{VERSION_PART}$")]
    base_model: BaseModelInfo
    parameterization: Parameterization
    estimator: Estimator
    loss: Literal["cross_entropy"]
    normalization: Normalization
    kfac_approx: KfacApprox | None = None
    datasets: list[DatasetInfo] = Field(min_length=1, max_length=256)
    datasets_combined: Literal["separate", "summed"]
    dtype: DType
    modules: dict[ModuleName, ModuleEntry] = Field(min_length=1, max_length=MAX_MODULES)
    files: dict[str, FileEntry] = Field(max_length=100_000)
    software: dict[str, str] = Field(default_factory=dict)
    license: str | None = Field(default=None, max_length=128)
    lineage: list[LineageEntry] | None = Field(default=None, min_length=1, max_length=256)

    def file_bytes(self) -> int:
        """The bytes of the listed files (headers and index included): what a pull downloads."""
        return sum(entry.size for entry in self.files.values())


INTRODUCED_IN = {
    **{
        f"structure {name}": e.introduced_in
        for name, e in zip(STRUCTURES, BLOCK_ENTRIES, strict=True)
        if e.introduced_in != "1.0"
    },
    "field lineage": "1.1",
    "fingerprint sha256-f32-v2": "1.3",
}
"""What each minor added: a manifest using these needs at least that spec_version (SPEC.md §10)."""


def features(manifest: Manifest) -> set[str]:
    """The versioned features (keys of :data:`INTRODUCED_IN`) a manifest uses."""
    used = {f"structure {b.structure}" for module in manifest.modules.values() for b in module.blocks}
    if manifest.lineage is not None:
        used.add("field lineage")
    fingerprints = [manifest.base_model.fingerprint, *(part.base_model.fingerprint for part in manifest.lineage or [])]
    if any(f is not None and (f.algorithm != "sha256-f32-v1" or f.modules is not None) for f in fingerprints):
        used.add("fingerprint sha256-f32-v2")
    return used & set(INTRODUCED_IN)


def required_version(manifest: Manifest) -> str:
    """The lowest spec_version able to hold the manifest: writers use it so that older readers can read."""
    return max(["1.0", *(INTRODUCED_IN[f] for f in features(manifest))], key=parse_version)


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    """The manifest as JSON data, leaving out unset fields of later minors.

    A manifest that uses no newer feature is then byte for byte what an older writer wrote.
    """
    data = manifest.model_dump(mode="json", exclude={"lineage"} if manifest.lineage is None else None)
    for base_model in [data["base_model"], *(part["base_model"] for part in data.get("lineage") or [])]:
        if base_model["fingerprint"] is not None and base_model["fingerprint"]["modules"] is None:
            del base_model["fingerprint"]["modules"]
    return data


def tensor_file_metadata(spec_version: str) -> dict[str, str]:
    """The one metadata key of every tensor file (one key: safetensors writes maps in random order)."""
    return {"format": f"{FORMAT_NAME}/{spec_version}"}


@dataclass(frozen=True)
class TensorSpec:
    """What a manifest implies about one stored tensor."""

    shape: tuple[int, ...]
    dtype: str
    role: Role
    where: str
    module: str


def parse_version(version: str) -> tuple[int, int]:
    """Split ``MAJOR.MINOR`` into integers; raises :class:`ManifestError` when malformed."""
    match = re.fullmatch(rf"({VERSION_PART})\.({VERSION_PART})", version)
    if match is None:
        raise ManifestError(f"spec_version {version!r} is not MAJOR.MINOR", location="spec_version")
    return int(match[1]), int(match[2])


def check_version(raw: dict[str, Any]) -> tuple[int, int]:
    """Refuse another format or major version before the rest of the manifest is parsed."""
    if raw.get("format") != FORMAT_NAME:
        raise ManifestError(f"format is {raw.get('format')!r}, expected {FORMAT_NAME!r}", location="format")
    version = raw.get("spec_version")
    if not isinstance(version, str):
        raise ManifestError("spec_version is missing or not a string", location="spec_version")
    found = parse_version(version)
    if found[0] != parse_version(SPEC_VERSION)[0]:
        raise UnsupportedVersionError(version, f"{parse_version(SPEC_VERSION)[0]}.x", location="spec_version")
    if found > parse_version(SPEC_VERSION):
        _refuse_unknown_structures(raw, version)
    return found


def _refuse_unknown_structures(raw: dict[str, Any], version: str) -> None:
    """A newer minor may add structures; skipping their curvature silently would be wrong (SPEC.md §10)."""
    modules = raw.get("modules")
    for name, module in (modules if isinstance(modules, dict) else {}).items():
        blocks = module.get("blocks") if isinstance(module, dict) else None
        for index, block in enumerate(blocks if isinstance(blocks, list) else []):
            structure = block.get("structure") if isinstance(block, dict) else None
            if isinstance(structure, str) and structure not in STRUCTURES:
                raise ManifestError(
                    f"block structure {structure!r} of spec {version} is unknown to this reader (spec "
                    f"{SPEC_VERSION}); upgrade laplace-hub",
                    location=f"modules.{name}.blocks.{index}",
                    code="manifest.unsupported_structure",
                )


def unknown_fields(model: BaseModel, path: str = "") -> Iterator[str]:
    """Yield the dotted paths of fields no model of this spec version declares."""
    for name in model.model_extra or {}:
        yield f"{path}{name}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        children = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else [(None, value)]
        )
        for index, child in children:
            if isinstance(child, BaseModel):
                suffix = f"{name}" if index is None else f"{name}.{index}"
                yield from unknown_fields(child, f"{path}{suffix}.")


def first_problem(error: _PydanticValidationError) -> tuple[str, str]:
    """Where (a dotted path) and what the first problem of a pydantic validation error is."""
    first = error.errors()[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"]


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Parse a manifest dict as a reader: any minor of our major, unknown fields kept with a warning.

    Raises:
        UnsupportedVersionError: another major version.
        ManifestError: anything else that does not match the models.

    """
    found = check_version(raw)
    try:
        manifest = Manifest.model_validate(raw)
    except _PydanticValidationError as e:
        where, message = first_problem(e)
        raise ManifestError(f"{message} ({e.error_count()} problem(s) in all)", location=where) from e
    extra = list(unknown_fields(manifest))
    if extra:
        if found <= parse_version(SPEC_VERSION):
            raise ManifestError(
                f"unknown field(s) {', '.join(extra)} in a spec {manifest.spec_version} manifest",
                location=extra[0],
            )
        warnings.warn(
            f"manifest of spec {manifest.spec_version} has fields this reader "
            f"({SPEC_VERSION}) does not know; kept as-is: {', '.join(extra)}",
            stacklevel=2,
        )
    return manifest


def _param_dims(param: Param, shape: list[int] | tuple[int, int], rank: int | None, where: str) -> tuple[int, int]:
    """(d_out, d_in) of the matrix a block covers."""
    d_out, d_in = shape
    if param == "weight":
        return d_out, d_in
    if rank is None:
        raise ManifestError(f"param {param!r} needs the lora parameterization", location=where, code="manifest.param")
    return (rank, d_in) if param == "lora_A" else (d_out, rank)


def _factor_shape(ref: FactorRef, n: int) -> tuple[int, ...]:
    return (n * (n + 1) // 2,) if ref.packed else (n, n)


def expected_tensors(manifest: Manifest) -> dict[str, TensorSpec]:
    """Every tensor key the manifest references, with the shape, dtype and role it implies.

    Raises:
        ManifestError: a key is referenced twice with different shapes or roles, or a block
            does not fit the parameterization.

    """
    lora = manifest.parameterization
    rank = lora.rank if isinstance(lora, LoraParameterization) else None
    found: dict[str, TensorSpec] = {}

    def add(key: str, spec: TensorSpec) -> None:
        if key in found and (found[key].shape, found[key].role) != (spec.shape, spec.role):
            raise ManifestError(
                f"tensor {key!r} is shared with {found[key].where} but implies shape "
                f"{list(spec.shape)} there vs {list(found[key].shape)}",
                location=spec.where,
                code="manifest.tensor_conflict",
            )
        found.setdefault(key, spec)

    for name, module in manifest.modules.items():
        for index, block in enumerate(module.blocks):
            where = f"modules.{name}.blocks.{index}"
            for key, shape, role in block.tensors(module.shape, rank, where):
                add(key, TensorSpec(shape, manifest.dtype, role, where, name))
        if module.lora_init is not None and isinstance(lora, LoraParameterization):
            d_out, d_in = module.shape
            where = f"modules.{name}.lora_init"
            add(module.lora_init.lora_A, TensorSpec((lora.rank, d_in), lora.init_dtype, "init", where, name))
            add(module.lora_init.lora_B, TensorSpec((d_out, lora.rank), lora.init_dtype, "init", where, name))
    return found


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of spec ``SPEC_VERSION`` manifests, strict about unknown fields.

    Readers of a newer minor tolerate unknown fields; the schema describes this version exactly.
    """
    schema = Manifest.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://laplace-hub.dev/spec/{SPEC_VERSION}/manifest.schema.json"
    schema["title"] = f"laplace-hub manifest, spec {SPEC_VERSION}"
    for definition in _objects(schema):
        if "properties" in definition or "patternProperties" in definition:
            definition["additionalProperties"] = False  # unknown fields; keys outside a name pattern
    return schema


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object schema in ``node``, nested ones (a dict's keys and values) included."""
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)
