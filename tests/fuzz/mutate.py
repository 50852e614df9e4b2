"""A mutation engine over the conformance vectors (spec/conformance/*/{valid,invalid}/*).

A *case* is one vector copied into a temp folder with 1–3 small, named mutations applied::

    case = make_case(root, seed=17)                       # all choices from random.Random(17)
    case = draw_case(data, root)                          # all choices from a hypothesis `data` draw
    case = make_case(root, vector="1.0/valid/weight-kron",
                     mutations=[("values.indefinite", {"eps": 1e-3})], refresh=True)

Every mutation is a function registered under ``<family>.<name>``; the families are ``manifest``
(the JSON document, then its raw bytes), ``safetensors`` (header and data bytes), ``index`` (the
shard index), ``values`` (decoded tensors, modified, written back with the same metadata) and ``fs``
(symlinks, FIFOs, directories, sparse huge files). Mutations run in stage order — file contents,
then (in most cases) a refresh of every ``files`` entry's size and sha256 so that the mutations
reach the parsers and value checks instead of stopping at the checksum, then the manifest document,
then its bytes, then the file system.

Nothing here imports ``laplace_hub``: the engine reads the manifest and the safetensors headers
itself, so that it does not inherit the bugs it is meant to find.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.fuzz.large import write_large

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "spec" / "conformance"
MANIFEST = "laplace.json"
SINGLE = "laplace.safetensors"
INDEX = "laplace.safetensors.index.json"
README = "README.md"
REFRESH_PROBABILITY = 0.85
VALID_PROBABILITY = 0.75
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
STAGES = ("files", "manifest", "manifest-bytes", "fs")  # refresh of checksums runs after stage 0


class NotApplicable(Exception):
    """This mutation cannot be applied to this folder (e.g. no eigen factor, no shard index)."""


class HarnessError(Exception):
    """A mutation failed for a reason that is a bug of the harness, not of the code under test."""


# --- choices: from a seeded RNG or from hypothesis ------------------------------------------------


class Chooser:
    """Every random decision of the engine goes through one of these."""

    def choice(self, seq: Sequence[Any]) -> Any:
        raise NotImplementedError

    def randint(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``."""
        raise NotImplementedError

    def coin(self, p: float = 0.5) -> bool:
        return self.randint(0, 999) < p * 1000

    def seed(self) -> int:
        return self.randint(0, 2**31 - 1)


class RandomChooser(Chooser):
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choice(self, seq: Sequence[Any]) -> Any:
        if not seq:
            raise NotApplicable("nothing to choose from")
        return seq[self.rng.randrange(len(seq))]

    def randint(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def weighted(self, items: Sequence[Any], weights: Sequence[float]) -> Any:
        return self.rng.choices(list(items), weights=list(weights))[0]


class DataChooser(Chooser):
    """Choices drawn from hypothesis' ``st.data()``, so that failing cases shrink by choice."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def choice(self, seq: Sequence[Any]) -> Any:
        if not seq:
            raise NotApplicable("nothing to choose from")
        return self.data.draw(self.st.sampled_from(list(seq)))

    def randint(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def weighted(self, items: Sequence[Any], weights: Sequence[float]) -> Any:
        return self.choice(items)


# --- JSON with raw pieces: huge ints, deep nesting, duplicate keys, NaN literals ------------------


@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim (what ``json.dumps`` cannot write: 5000-digit ints, depth 1e5)."""

    text: str


@dataclass(frozen=True)
class Dup:
    """A JSON object written with the given (possibly repeated) keys, in order."""

    pairs: tuple[tuple[str, Any], ...]


def dumps(obj: Any) -> str:
    """JSON text of ``obj``; python strings with lone surrogates come out as ``\\udXXX`` escapes."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, Dup):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in obj.pairs) + "}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    return json.dumps(obj)


def deep(kind: str, depth: int) -> Raw:
    if kind == "array":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a": ' * depth + "0" + "}" * depth)


def huge_int(digits: int = 5000, sign: str = "") -> Raw:
    return Raw(sign + "9" * digits)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


MAX_EDIT_DEPTH = 200  # deeper documents are not edited (this module's own walks are recursive)


def load_json(path: Path) -> Any:
    """Python's reading of a JSON file, or NotApplicable when python cannot read it (or it is too deep to edit)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise NotApplicable(f"{path.name} is not readable JSON: {type(e).__name__}") from e
    if _depth(doc) > MAX_EDIT_DEPTH:
        raise NotApplicable(f"{path.name} is nested deeper than {MAX_EDIT_DEPTH}")
    return doc


def _depth(doc: Any) -> int:
    """Nesting depth, without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, dict):
            stack += [(v, level + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, level + 1) for v in node]
    return deepest


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


# --- safetensors, read and written by hand -------------------------------------------------------


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header object, data bytes) of a safetensors file; NotApplicable when it does not parse."""
    if not is_regular(path):
        raise NotApplicable(f"{path.name} is not a regular file")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise NotApplicable("too short")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise NotApplicable("header length beyond the file")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise NotApplicable("header is not JSON") from e
    if not isinstance(header, dict):
        raise NotApplicable("header is not an object")
    if _depth(header) > MAX_EDIT_DEPTH:
        raise NotApplicable("header nested too deep to edit")
    return header, raw[8 + n :]


def write_st(path: Path, header: Any, data: bytes, pad: bytes = b" ") -> None:
    text = (header if isinstance(header, str) else dumps(header)).encode("utf-8", "surrogatepass")
    text += pad * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def tensor_entries(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Well-formed tensor entries of a header, in data order."""
    out = []
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            out.append((key, entry))
    return sorted(out, key=lambda kv: kv[1]["data_offsets"][0])


# --- what the manifest says about tensors ---------------------------------------------------------


@dataclass(frozen=True)
class KeyRef:
    """One reference of a tensor key in the manifest."""

    key: str
    role: str  # diagonal lowrank factor eigenvalues eigenvectors cross init
    module: str
    block: int | None
    field: str
    packed: bool = False
    structure: str | None = None


def key_refs(doc: Any) -> list[KeyRef]:
    """Every tensor reference of a manifest document, read defensively."""
    refs: list[KeyRef] = []
    modules = doc.get("modules") if isinstance(doc, dict) else None
    if not isinstance(modules, dict):
        return refs
    for name, module in modules.items():
        if not isinstance(module, dict):
            continue
        blocks = module.get("blocks")
        for i, block in enumerate(blocks if isinstance(blocks, list) else []):
            if not isinstance(block, dict):
                continue
            s = block.get("structure")

            def add(key: Any, role: str, fld: str, packed: Any = False) -> None:
                if isinstance(key, str):
                    refs.append(KeyRef(key, role, name, i, fld, packed is True, s))  # noqa: B023

            if s in ("diag", "diag_lowrank"):
                add(block.get("diagonal"), "diagonal", "diagonal")
                if s == "diag_lowrank":
                    add(block.get("lowrank"), "lowrank", "lowrank")
            for fld in ("input", "output", "a_input", "a_output", "b_input", "b_output"):
                ref = block.get(fld)
                if not isinstance(ref, dict):
                    continue
                if "key" in ref:
                    add(ref.get("key"), "factor", fld, ref.get("packed", False))
                else:
                    add(ref.get("eigenvalues"), "eigenvalues", fld)
                    add(ref.get("eigenvectors"), "eigenvectors", fld)
            for fld in ("cross_input", "cross_output"):
                add(block.get(fld), "cross", fld)
        init = module.get("lora_init")
        if isinstance(init, dict):
            for fld in ("lora_A", "lora_B"):
                if isinstance(init.get(fld), str):
                    refs.append(KeyRef(init[fld], "init", name, None, fld))
    return refs


# --- the mutation context ------------------------------------------------------------------------


@dataclass
class Ctx:
    folder: Path
    ch: Chooser
    forced: dict[str, Any] = field(default_factory=dict)
    picks: list[str] = field(default_factory=list)
    doc: Any = None  # the manifest document during stage 1

    def pick(self, name: str, options: Sequence[Any]) -> Any:
        value = self.forced[name] if name in self.forced else self.ch.choice(options)
        self.picks.append(f"{name}={_short(value)}")
        return value

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def load_manifest(self) -> Any:
        if not is_regular(self.manifest):
            raise NotApplicable("no regular laplace.json")
        return load_json(self.manifest)

    def save_manifest(self, doc: Any) -> None:
        self.manifest.write_text(dumps(doc) + "\n", encoding="utf-8", errors="surrogatepass")

    def edit_manifest(self, fn: Callable[[Any], Any]) -> None:
        doc = self.load_manifest()
        fn(doc)
        self.save_manifest(doc)

    def try_edit_manifest(self, fn: Callable[[Any], Any]) -> None:
        try:
            self.edit_manifest(fn)
        except NotApplicable:
            pass

    def tensor_files(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob("*.safetensors") if is_regular(p))

    def locations(self) -> dict[str, str]:
        """Tensor key -> file, from the headers that parse."""
        out: dict[str, str] = {}
        for name in self.tensor_files():
            try:
                header, _ = read_st(self.folder / name)
            except NotApplicable:
                continue
            for key, _entry in tensor_entries(header):
                out.setdefault(key, name)
        return out

    def refs(self) -> list[KeyRef]:
        try:
            return key_refs(self.load_manifest())
        except NotApplicable:
            return []

    def pick_ref(self, roles: set[str], structures: set[str] | None = None) -> tuple[str, KeyRef]:
        where = self.locations()
        refs = [
            r
            for r in self.refs()
            if r.role in roles and r.key in where and (structures is None or r.structure in structures)
        ]
        seen: dict[str, KeyRef] = {}
        for r in refs:
            seen.setdefault(r.key, r)
        if not seen:
            raise NotApplicable(f"no tensor with role {sorted(roles)}")
        ref = seen[self.ch.choice(sorted(seen))]
        self.picks.append(f"key={ref.key.rsplit('.', 3)[-3] if ref.key.count('.') >= 3 else ref.key}:{ref.field}")
        return where[ref.key], ref

    def load_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
        path = self.folder / name
        try:
            tensors = load_file(path)
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
        except Exception as e:  # a broken vector: the safetensors library refuses it
            raise NotApplicable(f"{name} does not load: {type(e).__name__}") from e
        return tensors, metadata

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.folder / name, metadata=metadata)

    def edit_tensor(self, name: str, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        tensors, metadata = self.load_tensors(name)
        tensors[key] = fn(tensors[key].clone())
        self.save_tensors(name, tensors, metadata)

    def torch_gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.ch.seed())


def _short(value: Any) -> str:
    if isinstance(value, Raw):
        return f"raw({len(value.text)} chars)" if len(value.text) > 24 else f"raw({value.text})"
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + f"…({len(text)})"


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    name: str
    stage: int
    fn: Callable[[Ctx], None]
    weight: float = 1.0
    expensive: bool = False  # slow or huge (sparse GiB files): only for the benchmark
    requires: str | None = None  # a vector feature (see `vector_features`) the mutation needs

    @property
    def family(self) -> str:
        return self.name.split(".")[0]


REGISTRY: dict[str, Mutation] = {}


def mutation(
    name: str, stage: int, weight: float = 1.0, expensive: bool = False, requires: str | None = None
) -> Callable[[Callable], Callable]:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        assert name not in REGISTRY, name
        REGISTRY[name] = Mutation(name, stage, fn, weight, expensive, requires)
        return fn

    return register


def family_of(label: str) -> str:
    return label.split(".")[0]


def base_name(label: str) -> str:
    return label.split("(")[0]


# ================================================================================================
# stage 0: tensor values
# ================================================================================================

CURVATURE_ROLES = {"diagonal", "lowrank", "factor", "eigenvalues", "eigenvectors", "cross"}
ALL_ROLES = CURVATURE_ROLES | {"init"}


def _side(packed_len: int) -> int:
    return round(((8 * packed_len + 1) ** 0.5 - 1) / 2)


def _to_dense(t: torch.Tensor, ref: KeyRef) -> torch.Tensor:
    t = t.to(torch.float64)
    if t.dim() == 1:
        n = _side(t.shape[0])
        rows, cols = torch.triu_indices(n, n)
        m = t.new_zeros(n, n)
        m[rows, cols] = t
        m[cols, rows] = t
        return m
    return t


def _from_dense(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 1:
        rows, cols = torch.triu_indices(m.shape[0], m.shape[0])
        m = m[rows, cols]
    return m.to(like.dtype).contiguous()


def _set_flat(t: torch.Tensor, index: int, value: float) -> torch.Tensor:
    flat = t.reshape(-1).clone()
    flat[index % max(flat.numel(), 1)] = value
    return flat.reshape(t.shape)


@mutation("values.non_finite", 0)
def _non_finite(ctx: Ctx) -> None:
    value = ctx.pick("value", [float("nan"), float("inf"), float("-inf")])
    name, ref = ctx.pick_ref(ALL_ROLES)
    index = ctx.ch.randint(0, 10**6)
    ctx.edit_tensor(name, ref.key, lambda t: _set_flat(t, index, value) if t.numel() else t)


@mutation("values.negate_entry", 0)
def _negate_entry(ctx: Ctx) -> None:
    name, ref = ctx.pick_ref(CURVATURE_ROLES)
    index = ctx.ch.randint(0, 10**6)

    def fn(t: torch.Tensor) -> torch.Tensor:
        if not t.numel():
            raise NotApplicable("empty tensor")
        flat = t.reshape(-1).clone()
        i = index % flat.numel()
        flat[i] = -flat[i] if flat[i] != 0 else -1.0
        return flat.reshape(t.shape)

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.negate_tensor", 0)
def _negate_tensor(ctx: Ctx) -> None:
    name, ref = ctx.pick_ref(CURVATURE_ROLES)
    ctx.edit_tensor(name, ref.key, lambda t: -t)


@mutation("values.scale", 0)
def _scale(ctx: Ctx) -> None:
    k = ctx.pick("k", [1e30, 1e-30, 1e20, 1e-45, 1e19])
    name, ref = ctx.pick_ref(CURVATURE_ROLES)
    ctx.edit_tensor(name, ref.key, lambda t: (t.to(torch.float64) * k).to(t.dtype))


@mutation("values.scale_all", 0)
def _scale_all(ctx: Ctx) -> None:
    """Every curvature tensor scaled: Kronecker products of 1e30 factors overflow float32."""
    k = ctx.pick("k", [1e30, 1e20, 1e-30, 1e19])
    keys = {r.key for r in ctx.refs() if r.role in CURVATURE_ROLES - {"eigenvectors"}}
    done = False
    for name in ctx.tensor_files():
        tensors, metadata = ctx.load_tensors(name)
        for key in keys & tensors.keys():
            tensors[key] = (tensors[key].to(torch.float64) * k).to(tensors[key].dtype)
            done = True
        ctx.save_tensors(name, tensors, metadata)
    if not done:
        raise NotApplicable("no curvature tensor")
    _scale_tails(ctx, k)


def _scale_tails(ctx: Ctx, k: float) -> None:
    def fn(doc: Any) -> None:
        for _name, _i, block in _blocks(doc):
            for fld in ("input", "output"):
                ref = block.get(fld)
                if isinstance(ref, dict) and isinstance(ref.get("tail"), int | float):
                    ref["tail"] = ref["tail"] * k

    ctx.try_edit_manifest(fn)


@mutation("values.indefinite", 0, weight=2.0)
def _indefinite(ctx: Ctx) -> None:
    """F − (λ_min + ε·λ_max)·I: smallest eigenvalue exactly −ε·λ_max."""
    eps = ctx.pick("eps", [1e-2, 1e-3, 1e-4, 2e-5, 1e-6, 1e-9])
    name, ref = ctx.pick_ref({"factor"})

    def fn(t: torch.Tensor) -> torch.Tensor:
        m = _to_dense(t, ref)
        if not torch.isfinite(m).all():  # an earlier mutation put NaN/inf here: no spectrum to shift
            return t
        w = torch.linalg.eigvalsh((m + m.T) / 2)
        shift = w[0].item() + eps * max(w[-1].item(), 0.0)
        return _from_dense(m - shift * torch.eye(m.shape[0], dtype=m.dtype), t)

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.asymmetric", 0)
def _asymmetric(ctx: Ctx) -> None:
    delta = ctx.pick("delta", [1.0, 1e-3, 1e-6, 1e-9])
    name, ref = ctx.pick_ref({"factor"})
    if ref.packed:
        raise NotApplicable("a packed factor is symmetric by construction")

    def fn(t: torch.Tensor) -> torch.Tensor:
        m = t.to(torch.float64)
        if m.shape[0] < 2:
            raise NotApplicable("1x1 factor")
        m[0, 1] += delta * m.abs().max().item()
        return m.to(t.dtype)

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.eigvec_perturb", 0, requires="eigen")
def _eigvec_perturb(ctx: Ctx) -> None:
    noise = ctx.pick("noise", [0.3, 1e-2, 1e-4])
    name, ref = ctx.pick_ref({"eigenvectors"})
    gen = ctx.torch_gen()
    ctx.edit_tensor(
        name,
        ref.key,
        lambda t: (t.double() + noise * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(t.dtype),
    )


@mutation("values.eigvec_scale", 0, requires="eigen")
def _eigvec_scale(ctx: Ctx) -> None:
    k = ctx.pick("k", [2.0, 0.5, 10.0])
    name, ref = ctx.pick_ref({"eigenvectors"})
    ctx.edit_tensor(name, ref.key, lambda t: t * k)


@mutation("values.eigvec_rotate", 0, requires="eigen")
def _eigvec_rotate(ctx: Ctx) -> None:
    """Rotate the eigenvector columns among themselves: still orthonormal, eigenvalues now mismatched."""
    angle = ctx.pick("angle", [0.3, 1.0])
    name, ref = ctx.pick_ref({"eigenvectors"})

    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2 or t.shape[1] < 2:
            raise NotApplicable("rank-1 eigenvectors")
        v = t.double().clone()
        c, s = math.cos(angle), math.sin(angle)
        a, b = v[:, 0].clone(), v[:, 1].clone()
        v[:, 0], v[:, 1] = c * a - s * b, s * a + c * b
        return v.to(t.dtype)

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.eigvec_duplicate", 0, requires="eigen")
def _eigvec_duplicate(ctx: Ctx) -> None:
    name, ref = ctx.pick_ref({"eigenvectors"})

    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2 or t.shape[1] < 2:
            raise NotApplicable("rank-1 eigenvectors")
        t[:, 1] = t[:, 0]
        return t

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.eigval_unsort", 0, requires="eigen")
def _eigval_unsort(ctx: Ctx) -> None:
    name, ref = ctx.pick_ref({"eigenvalues"})
    ctx.edit_tensor(name, ref.key, lambda t: t.flip(0))


def _eigen_ref(doc: Any, ref: KeyRef) -> dict[str, Any]:
    block = doc["modules"][ref.module]["blocks"][ref.block]
    return block[ref.field]


@mutation("values.eigval_below_tail", 0, requires="eigen")
def _eigval_below_tail(ctx: Ctx) -> None:
    """Eigenvalues below the tail: tail raised to 10·λ_max (or eigenvalues lowered under it)."""
    name, ref = ctx.pick_ref({"eigenvalues"})
    how = ctx.pick("how", ["raise_tail", "lower_eigenvalues"])
    values = ctx.load_tensors(name)[0][ref.key].double()
    top = float(values.abs().max()) if values.numel() else 1.0
    if how == "raise_tail":
        ctx.edit_manifest(lambda doc: _eigen_ref(doc, ref).__setitem__("tail", 10.0 * (top or 1.0)))
    else:
        tail = _eigen_ref(ctx.load_manifest(), ref).get("tail")
        if not isinstance(tail, int | float) or tail <= 0:
            ctx.edit_manifest(lambda doc: _eigen_ref(doc, ref).__setitem__("tail", 10.0 * (top or 1.0)))
            tail = 10.0 * (top or 1.0)
        ctx.edit_tensor(name, ref.key, lambda t: torch.full_like(t, tail / 10))


@mutation("values.eig_below_tail_stretched", 0, requires="eigen")
def _eig_below_tail_stretched(ctx: Ctx) -> None:
    """Tail above the eigenvalues and eigenvectors of norm 2: V diag(λ−tail) Vᵀ + tail·I is indefinite."""
    name, ref = ctx.pick_ref({"eigenvalues"})
    values = ctx.load_tensors(name)[0][ref.key].double()
    top = float(values.abs().max()) if values.numel() else 1.0
    ctx.edit_manifest(lambda doc: _eigen_ref(doc, ref).__setitem__("tail", 10.0 * (top or 1.0)))
    vectors = _eigen_ref(ctx.load_manifest(), ref).get("eigenvectors")
    where = ctx.locations()
    if vectors not in where:
        raise NotApplicable("eigenvectors not stored")
    ctx.edit_tensor(where[vectors], vectors, lambda t: t * 2)


@mutation("values.eig_rank1", 0, requires="eigen")
def _eig_rank1(ctx: Ctx) -> None:
    """Truncate an eigen factor to rank 1 (still a valid artifact; gives tensors with a dimension of 1)."""
    name, ref = ctx.pick_ref({"eigenvalues"})
    doc = ctx.load_manifest()
    eig = _eigen_ref(doc, ref)
    vectors = eig.get("eigenvectors")
    where = ctx.locations()
    if vectors not in where:
        raise NotApplicable("eigenvectors not stored")
    ctx.edit_tensor(name, ref.key, lambda t: t[:1].clone())
    ctx.edit_tensor(where[vectors], vectors, lambda t: t[:, :1].clone())

    def fn(doc: Any) -> None:
        for _name, _i, block in _blocks(doc):
            for fld in ("input", "output"):
                r = block.get(fld)
                if isinstance(r, dict) and r.get("eigenvalues") == ref.key:
                    r["rank"] = 1

    ctx.edit_manifest(fn)


def _cast_all(ctx: Ctx, dtype: str) -> None:
    keys = {r.key for r in ctx.refs() if r.role in CURVATURE_ROLES}
    if not keys:
        raise NotApplicable("no curvature tensor")
    for name in ctx.tensor_files():
        tensors, metadata = ctx.load_tensors(name)
        for key in keys & tensors.keys():
            tensors[key] = tensors[key].to(DTYPES[dtype])
        ctx.save_tensors(name, tensors, metadata)
    ctx.edit_manifest(lambda doc: doc.__setitem__("dtype", dtype))


@mutation("values.cast", 0, weight=1.5)
def _cast(ctx: Ctx) -> None:
    """Every curvature tensor cast (and the manifest dtype with it): rounding to bf16 can break PSD."""
    dtype = ctx.pick("dtype", ["bfloat16", "float16", "float64", "float32"])
    _cast_all(ctx, dtype)


@mutation("values.cast_one", 0, weight=0.5)
def _cast_one(ctx: Ctx) -> None:
    dtype = ctx.pick("dtype", ["bfloat16", "float16", "float64", "float32"])
    name, ref = ctx.pick_ref(ALL_ROLES)
    ctx.edit_tensor(name, ref.key, lambda t: t.to(DTYPES[dtype]))


@mutation("values.bf16_indefinite", 0, weight=1.5)
def _bf16_indefinite(ctx: Ctx) -> None:
    """Cast to a half type, then make one factor indefinite by ε·λ_max (below the half tolerance 1e-2)."""
    dtype = ctx.pick("dtype", ["bfloat16", "float16"])
    eps = ctx.pick("eps", [3e-3, 1e-3, 1e-4])
    _cast_all(ctx, dtype)
    name, ref = ctx.pick_ref({"factor"})

    def fn(t: torch.Tensor) -> torch.Tensor:
        m = _to_dense(t, ref)
        for _ in range(4):  # rounding to the half type moves the eigenvalues: aim again
            try:
                w = torch.linalg.eigvalsh((m + m.T) / 2)
            except torch.linalg.LinAlgError as e:  # an earlier mutation left a value eigh cannot take
                raise NotApplicable("eigvalsh does not converge") from e
            m = m - (w[0].item() + eps * max(w[-1].item(), 0.0)) * torch.eye(m.shape[0], dtype=m.dtype)
            m = _to_dense(_from_dense(m, t), ref)
        return _from_dense(m, t)

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.cross_scale", 0, weight=1.5, requires="tridiag")
def _cross_scale(ctx: Ctx) -> None:
    """kron_tridiag cross blocks scaled: the pair precision leaves PSD while every factor stays PSD."""
    k = ctx.pick("k", [10.0, 1.001, 1.1, -1.0, 0.0, 1e30])
    which = ctx.pick("which", ["cross_input", "cross_output", "both"])
    refs = [r for r in ctx.refs() if r.role == "cross" and (which == "both" or r.field == which)]
    where = ctx.locations()
    refs = [r for r in refs if r.key in where]
    if not refs:
        raise NotApplicable("no kron_tridiag block")
    module = ctx.ch.choice(sorted({r.module for r in refs}))
    for r in refs:
        if r.module == module:
            ctx.edit_tensor(where[r.key], r.key, lambda t: (t.double() * k).to(t.dtype))


@mutation("values.f64_1e300", 0, weight=1.5)
def _f64_1e300(ctx: Ctx) -> None:
    """Cast to float64 (manifest too), then put 1e300 somewhere finite and sign-valid."""
    present = sorted({r.role for r in ctx.refs()} & {"diagonal", "factor", "eigenvalues", "cross", "lowrank"})
    role = ctx.pick("role", present)
    doc = ctx.load_manifest()
    if doc.get("dtype") != "float64":
        _cast_all(ctx, "float64")
    name, ref = ctx.pick_ref({role})

    def fn(t: torch.Tensor) -> torch.Tensor:
        if role == "factor":
            m = _to_dense(t, ref)
            m[0, 0] = 1e300
            return _from_dense(m, t)
        return _set_flat(t, 0, 1e300)

    ctx.edit_tensor(name, ref.key, fn)


@mutation("values.f64_subnormal", 0, weight=0.5)
def _f64_subnormal(ctx: Ctx) -> None:
    doc = ctx.load_manifest()
    if doc.get("dtype") != "float64":
        _cast_all(ctx, "float64")
    name, ref = ctx.pick_ref(CURVATURE_ROLES - {"eigenvectors"})
    ctx.edit_tensor(name, ref.key, lambda t: torch.full_like(t, 1e-320))


@mutation("values.zero", 0)
def _zero(ctx: Ctx) -> None:
    name, ref = ctx.pick_ref(CURVATURE_ROLES)
    ctx.edit_tensor(name, ref.key, torch.zeros_like)


@mutation("values.diag_tiny_negative", 0, weight=0.5)
def _diag_tiny_negative(ctx: Ctx) -> None:
    value = ctx.pick("value", [-1e-30, -0.0, -1e-45])
    name, ref = ctx.pick_ref({"diagonal", "eigenvalues"})
    ctx.edit_tensor(name, ref.key, lambda t: _set_flat(t, -1, value))


@mutation("values.rank_one_factor", 0, weight=0.5)
def _rank_one_factor(ctx: Ctx) -> None:
    """A singular PSD factor v·vᵀ: fine in exact arithmetic, rounding makes it a hair indefinite."""
    name, ref = ctx.pick_ref({"factor"})
    gen = ctx.torch_gen()

    def fn(t: torch.Tensor) -> torch.Tensor:
        m = _to_dense(t, ref)
        v = torch.randn(m.shape[0], 1, generator=gen, dtype=torch.float64)
        return _from_dense(v @ v.T, t)

    ctx.edit_tensor(name, ref.key, fn)


# ================================================================================================
# stage 0: safetensors bytes
# ================================================================================================


def _pick_st(ctx: Ctx) -> Path:
    files = ctx.tensor_files()
    if not files:
        raise NotApplicable("no tensor file")
    return ctx.folder / ctx.ch.choice(files)


def _st_edit(ctx: Ctx, fn: Callable[[dict[str, Any], bytes], tuple[Any, bytes]]) -> None:
    path = _pick_st(ctx)
    header, data = read_st(path)
    new_header, new_data = fn(header, data)
    write_st(path, new_header, new_data)


@mutation("safetensors.prefix", 0)
def _st_prefix(ctx: Ctx) -> None:
    how = ctx.pick("how", ["+1", "-1", "+8", "-8", "0", "2^63", "2^64-1", "filesize-8", "filesize", "100MiB+1"])
    path = _pick_st(ctx)
    raw = bytearray(path.read_bytes())
    if len(raw) < 8:
        raise NotApplicable("too short")
    (n,) = struct.unpack("<Q", raw[:8])
    value = {
        "+1": n + 1, "-1": n - 1, "+8": n + 8, "-8": n - 8, "0": 0, "2^63": 2**63, "2^64-1": 2**64 - 1,
        "filesize-8": len(raw) - 8, "filesize": len(raw), "100MiB+1": 100 * 2**20 + 1,
    }[how]  # fmt: skip
    raw[:8] = struct.pack("<Q", max(0, min(value, 2**64 - 1)))
    path.write_bytes(bytes(raw))


@mutation("safetensors.trailing_bytes", 0, weight=1.5)
def _st_trailing(ctx: Ctx) -> None:
    n = ctx.pick("n", [1, 8, 4096])
    content = ctx.pick("content", ["zeros", "random"])
    rnd = random.Random(ctx.ch.seed())
    extra = bytes(n) if content == "zeros" else bytes(rnd.randrange(256) for _ in range(n))
    path = _pick_st(ctx)
    read_st(path)  # only files whose header parses: the point is bytes *after* valid data
    with path.open("ab") as f:
        f.write(extra)


@mutation("safetensors.hole", 0)
def _st_hole(ctx: Ctx) -> None:
    n = ctx.pick("n", [4, 8, 2])

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        entries = tensor_entries(header)
        if not entries:
            raise NotApplicable("no tensors")
        i = ctx.ch.randint(0, len(entries) - 1)
        at = entries[i][1]["data_offsets"][0]
        for _key, entry in entries[i:]:
            entry["data_offsets"] = [entry["data_offsets"][0] + n, entry["data_offsets"][1] + n]
        return header, data[:at] + bytes(n) + data[at:]

    _st_edit(ctx, fn)


@mutation("safetensors.overlap", 0, weight=1.5)
def _st_overlap(ctx: Ctx) -> None:
    """Tensor j starts s bytes inside tensor j−1 (file shortened by s: no hole, no trailing bytes)."""
    how = ctx.pick("how", ["partial", "full"])

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        entries = tensor_entries(header)
        if len(entries) < 2:
            raise NotApplicable("fewer than two tensors")
        j = ctx.ch.randint(1, len(entries) - 1)
        (_, prev), (_, cur) = entries[j - 1], entries[j]
        a, b = prev["data_offsets"]
        b2, c = cur["data_offsets"]
        if b2 != b:
            raise NotApplicable("not contiguous")
        size = ST_DTYPES.get(cur.get("dtype"), 4) if isinstance(cur.get("dtype"), str) else 4
        s = min(b - a, c - b) if how == "full" else min(size, b - a, c - b)
        if s <= 0:
            raise NotApplicable("empty tensor")
        cur["data_offsets"] = [b - s, c - s]
        for _key, entry in entries[j + 1 :]:
            entry["data_offsets"] = [entry["data_offsets"][0] - s, entry["data_offsets"][1] - s]
        return header, data[: c - s] + data[c:]

    _st_edit(ctx, fn)


@mutation("safetensors.shape_true", 0, weight=1.5, requires="eigen")
def _st_shape_true(ctx: Ctx) -> None:
    """`true` for a dimension of 1 (Python: True == 1); without one, an eigen factor goes to rank 1 first."""
    how = ctx.pick("how", ["true", "false", "1.0"])
    value = {"true": True, "false": False, "1.0": 1.0}[how]

    def find() -> tuple[Path, dict[str, Any], bytes, list[tuple[str, dict[str, Any]]]]:
        for name in ctx.tensor_files():
            header, data = read_st(ctx.folder / name)
            ones = [(k, e) for k, e in tensor_entries(header) if isinstance(e.get("shape"), list) and 1 in e["shape"]]
            if ones:
                return ctx.folder / name, header, data, ones
        raise NotApplicable("no dimension of 1")

    try:
        path, header, data, ones = find()
    except NotApplicable:
        _eig_rank1(ctx)
        path, header, data, ones = find()
    _key, entry = ctx.ch.choice(ones)
    entry["shape"] = [value if d == 1 else d for d in entry["shape"]]
    write_st(path, header, data)


@mutation("safetensors.shape_edit", 0)
def _st_shape_edit(ctx: Ctx) -> None:
    how = ctx.pick("how", ["negative_pair", "float", "string", "2^40", "empty", "extra_1", "swap"])

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        entries = [(k, e) for k, e in tensor_entries(header) if isinstance(e.get("shape"), list)]
        if not entries:
            raise NotApplicable("no tensors")
        _key, entry = ctx.ch.choice(entries)
        shape = entry["shape"]
        if how == "negative_pair":
            entry["shape"] = [-d for d in shape] if len(shape) % 2 == 0 else [-1, -shape[0], *shape[1:]]
        elif how == "float":
            entry["shape"] = [float(d) for d in shape]
        elif how == "string":
            entry["shape"] = [str(d) for d in shape]
        elif how == "2^40":
            entry["shape"] = [2**40, *shape[1:]]
        elif how == "empty":
            entry["shape"] = []
        elif how == "extra_1":
            entry["shape"] = [1, *shape]
        else:
            entry["shape"] = list(reversed(shape))
        return header, data

    _st_edit(ctx, fn)


def _set_some_dtype(ctx: Ctx, value: Any) -> None:
    """One tensor's header dtype becomes ``value``."""

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        entries = tensor_entries(header)
        if not entries:
            raise NotApplicable("no tensors")
        ctx.ch.choice(entries)[1]["dtype"] = value
        return header, data

    _st_edit(ctx, fn)


@mutation("safetensors.dtype_object", 0, weight=1.5)
def _st_dtype_object(ctx: Ctx) -> None:
    _set_some_dtype(ctx, ctx.pick("value", [{}, [], None, 4, ["F32"], True]))


@mutation("safetensors.dtype_unknown", 0)
def _st_dtype_unknown(ctx: Ctx) -> None:
    _set_some_dtype(
        ctx, ctx.pick("value", ["I32", "U32", "F8_E4M3", "BOOL", "f32", "F32 ", "F16", "BF16", "F64", "I64"])
    )


@mutation("safetensors.header_deep", 0, weight=1.5)
def _st_header_deep(ctx: Ctx) -> None:
    depth = ctx.pick("depth", [100000, 5000, 900])
    kind = ctx.pick("kind", ["array", "object"])
    where = ctx.pick("where", ["metadata_value", "extra_key", "shape", "data_offsets"])

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        nest = deep(kind, depth)
        if where == "metadata_value":
            meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
            header["__metadata__"] = {**meta, "deep": nest}
        elif where == "extra_key":
            header["zz_deep"] = nest
        else:
            entries = tensor_entries(header)
            if not entries:
                raise NotApplicable("no tensors")
            ctx.ch.choice(entries)[1][where] = nest
        return header, data

    _st_edit(ctx, fn)


@mutation("safetensors.metadata", 0)
def _st_metadata(ctx: Ctx) -> None:
    how = ctx.pick(
        "how",
        ["extra_key", "non_string", "null_format", "missing", "not_object", "format_other", "format_9.9",
         "format_2.0", "format_empty", "format_nul", "format_surrogate", "dup_format"],
    )  # fmt: skip

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        meta = header.get("__metadata__")
        meta = dict(meta) if isinstance(meta, dict) else {}
        fmt = meta.get("format", "laplace-hub/1.0")
        if how == "extra_key":
            meta["comment"] = "x"
        elif how == "non_string":
            meta["format"] = {"a": 1}
        elif how == "null_format":
            meta["format"] = None
        elif how == "missing":
            header.pop("__metadata__", None)
            return header, data
        elif how == "not_object":
            header["__metadata__"] = ["format", fmt]
            return header, data
        elif how == "dup_format":
            pairs = [(k, v) for k, v in header.items() if k != "__metadata__"]
            return Dup((("__metadata__", Dup((("format", "other/1.0"), ("format", fmt)))), *pairs)), data
        else:
            meta["format"] = {
                "format_other": "other/1.1", "format_9.9": "laplace-hub/9.9", "format_2.0": "laplace-hub/2.0",
                "format_empty": "", "format_nul": fmt + "\u0000", "format_surrogate": "laplace-hub/\ud800",
            }[how]  # fmt: skip
        header = {"__metadata__": meta, **{k: v for k, v in header.items() if k != "__metadata__"}}
        return header, data

    _st_edit(ctx, fn)


@mutation("safetensors.header_text", 0)
def _st_header_text(ctx: Ctx) -> None:
    how = ctx.pick("how", ["not_object", "null", "nul_padding", "tab_padding", "surrogate_key", "dup_key", "nul_key"])
    path = _pick_st(ctx)
    header, data = read_st(path)
    if how == "not_object":
        write_st(path, "[]", data)
    elif how == "null":
        write_st(path, "null", data)
    elif how in ("nul_padding", "tab_padding"):
        text = dumps(header) + " "  # force some padding
        write_st(path, text, data, pad=b"\x00" if how == "nul_padding" else b"\t")
    else:
        suffix = ctx.forced.get("key_suffix", "")  # regressions can name the tensor (e.g. ".eigenvalues")
        entries = [(k, e) for k, e in tensor_entries(header) if k.endswith(suffix)]
        if not entries:
            raise NotApplicable("no tensors")
        key, entry = ctx.ch.choice(entries)
        if how == "dup_key":
            pairs = [(k, v) for k, v in header.items()] + [(key, {**entry, "dtype": "F16"})]
            write_st(path, Dup(tuple(pairs)), data)
            return
        new_key = key + ("\ud800" if how == "surrogate_key" else "\u0000")
        header = {(new_key if k == key else k): v for k, v in header.items()}
        write_st(path, header, data)


@mutation("safetensors.offsets", 0)
def _st_offsets(ctx: Ctx) -> None:
    how = ctx.pick("how", ["float", "string", "one", "three", "null", "object", "negative", "2^64", "reversed", "bool"])

    def fn(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        entries = tensor_entries(header)
        if not entries:
            raise NotApplicable("no tensors")
        _key, entry = ctx.ch.choice(entries)
        a, b = entry["data_offsets"]
        entry["data_offsets"] = {
            "float": [float(a), float(b)], "string": [str(a), str(b)], "one": [a], "three": [a, b, b],
            "null": None, "object": {"start": a, "end": b}, "negative": [a - 8, b - 8], "2^64": [a, 2**64 + b],
            "reversed": [b, a], "bool": [False, True],
        }[how]  # fmt: skip
        return header, data

    _st_edit(ctx, fn)


@mutation("safetensors.byte_flip", 0, weight=1.5)
def _st_byte_flip(ctx: Ctx) -> None:
    where = ctx.pick("where", ["data", "data", "header", "prefix"])
    count = ctx.pick("count", [1, 3])
    path = _pick_st(ctx)
    raw = bytearray(path.read_bytes())
    if len(raw) < 9:
        raise NotApplicable("too short")
    (n,) = struct.unpack("<Q", raw[:8])
    lo, hi = {"data": (8 + n, len(raw) - 1), "header": (8, 7 + n), "prefix": (0, 7)}[where]
    lo, hi = max(lo, 0), min(hi, len(raw) - 1)
    if lo > hi:
        raise NotApplicable("empty region")
    for _ in range(count):
        i = ctx.ch.randint(lo, hi)
        raw[i] ^= 1 << ctx.ch.randint(0, 7)
    path.write_bytes(bytes(raw))


@mutation("safetensors.truncate", 0)
def _st_truncate(ctx: Ctx) -> None:
    where = ctx.pick("where", ["data", "header", "empty", "last_byte"])
    path = _pick_st(ctx)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
    if where == "empty":
        cut = 0
    elif where == "last_byte":
        cut = len(raw) - 1
    elif where == "header":
        cut = ctx.ch.randint(0, min(len(raw), 8 + n))
    else:
        cut = ctx.ch.randint(min(8 + n, len(raw)), len(raw))
    path.write_bytes(raw[: max(cut, 0)])


# ================================================================================================
# stage 0: the shard index
# ================================================================================================


def _index_edit(ctx: Ctx, fn: Callable[[Any], Any]) -> None:
    path = ctx.folder / INDEX
    if not is_regular(path):
        raise NotApplicable("not sharded")
    doc = load_json(path)
    out = fn(doc)
    path.write_text(dumps(doc if out is None else out), encoding="utf-8", errors="surrogatepass")


@mutation("index.weight_map", 0, requires="index")
def _index_weight_map(ctx: Ctx) -> None:
    how = ctx.pick("how", ["drop_key", "wrong_shard", "extra_key", "shard_int", "shard_escape", "shard_manifest",
                          "shard_list", "surrogate_key", "not_object", "list", "null"])  # fmt: skip

    def fn(doc: Any) -> Any:
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise NotApplicable("no weight_map")
        key = ctx.ch.choice(sorted(wm))
        shards = sorted(set(wm.values()), key=repr)  # an earlier mutation may have put a non-string there
        if how == "drop_key":
            del wm[key]
        elif how == "wrong_shard":
            others = [s for s in shards if s != wm[key]]
            if not others:
                raise NotApplicable("one shard")
            wm[key] = others[0]
        elif how == "extra_key":
            wm["not.a.tensor"] = shards[0]
        elif how == "shard_int":
            wm[key] = 1
        elif how == "shard_escape":
            wm[key] = "../" + wm[key]
        elif how == "shard_manifest":
            wm[key] = MANIFEST
        elif how == "shard_list":
            wm[key] = [wm[key]]
        elif how == "surrogate_key":
            wm[key + "\ud800"] = wm.pop(key)
        elif how == "not_object":
            return [doc]
        elif how == "list":
            doc["weight_map"] = list(wm.items())
        else:
            doc["weight_map"] = None
        return None

    _index_edit(ctx, fn)


@mutation("index.raw", 0, requires="index")
def _index_raw(ctx: Ctx) -> None:
    how = ctx.pick("how", ["deep", "huge_total", "metadata_list", "nan_total"])

    def fn(doc: Any) -> None:
        if not isinstance(doc, dict):
            raise NotApplicable("index not an object")
        if how == "deep":
            doc["metadata"] = {"total_size": 0, "deep": deep("array", 100000)}
        elif how == "huge_total":
            doc["metadata"] = {"total_size": huge_int()}
        elif how == "metadata_list":
            doc["metadata"] = []
        else:
            doc["metadata"] = {"total_size": Raw("NaN")}

    _index_edit(ctx, fn)


# ================================================================================================
# refresh of the checksums (between stage 0 and stage 1)
# ================================================================================================


def refresh_checksums(folder: Path, limit: int = 2**31) -> bool:
    """Rewrite every ``files`` entry of a regular, not-too-large file with its real size and sha256."""
    path = folder / MANIFEST
    if not is_regular(path):
        return False
    try:
        doc = load_json(path)
    except NotApplicable:
        return False
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return False
    for name, entry in files.items():
        target = folder / name if isinstance(name, str) and "/" not in name and name not in ("", ".", "..") else None
        if target is None or not is_regular(target) or target.stat().st_size > limit:
            continue
        files[name] = {
            **(entry if isinstance(entry, dict) else {}),
            "size": target.stat().st_size,
            "sha256": sha256_file(target),
        }
    path.write_text(dumps(doc) + "\n", encoding="utf-8", errors="surrogatepass")
    return True


# ================================================================================================
# stage 1: the manifest document
# ================================================================================================


def _doc(ctx: Ctx) -> dict[str, Any]:
    if not isinstance(ctx.doc, dict):
        raise NotApplicable("manifest is not a JSON object python can read")
    return ctx.doc


def _modules(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    modules = doc.get("modules") if isinstance(doc, dict) else None
    if not isinstance(modules, dict):
        return []
    return [(k, v) for k, v in modules.items() if isinstance(v, dict)]


def _blocks(doc: Any) -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for name, module in _modules(doc):
        blocks = module.get("blocks")
        for i, block in enumerate(blocks if isinstance(blocks, list) else []):
            if isinstance(block, dict):
                out.append((name, i, block))
    return out


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _pick_path(ctx: Ctx, predicate: Callable[[Any], bool] = lambda v: True) -> tuple[Any, ...]:
    doc = _doc(ctx)
    paths = [p for p in _paths(doc) if predicate(_get(doc, p))]
    path = ctx.ch.choice(paths)
    ctx.picks.append("at=" + ".".join(map(str, path))[-60:])
    return path


def _set_at(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(doc, path[:-1])[path[-1]] = value


SWAP_VALUES: list[Any] = [0, 1, -1, 2**31, 2**63, 2**64, "x", "", "4", [], [1], {}, {"a": 1}, True, False, None,
                          0.5, -0.0, 1e300]  # fmt: skip


@mutation("manifest.delete_field", 1, weight=1.5)
def _m_delete(ctx: Ctx) -> None:
    path = _pick_path(ctx)
    parent = _get(_doc(ctx), path[:-1])
    del parent[path[-1]]


@mutation("manifest.swap_type", 1, weight=2.0)
def _m_swap_type(ctx: Ctx) -> None:
    path = _pick_path(ctx)
    current = _get(_doc(ctx), path)
    options = [v for v in SWAP_VALUES if type(v) is not type(current) or v != current]
    _set_at(_doc(ctx), path, ctx.pick("value", options))


@mutation("manifest.duplicate_field", 1)
def _m_duplicate(ctx: Ctx) -> None:
    """A key written twice: Python keeps the last, other parsers the first or refuse."""
    path = _pick_path(ctx, lambda v: isinstance(v, dict) and bool(v))
    obj = _get(_doc(ctx), path) if path else _doc(ctx)
    key = ctx.ch.choice(sorted(obj))
    first = ctx.pick("first", ["other", "same"])
    value = obj[key] if first == "same" else ctx.ch.choice(SWAP_VALUES)
    dup = Dup(((key, value), *obj.items()))
    _set_at(_doc(ctx), path, dup)


@mutation("manifest.duplicate_top", 1, weight=0.5)
def _m_duplicate_top(ctx: Ctx) -> None:
    doc = _doc(ctx)
    key = ctx.pick("key", ["dtype", "spec_version", "modules", "files", "datasets_combined"])
    if key not in doc:
        raise NotApplicable("no such key")
    first = {"dtype": "float64", "spec_version": "2.0", "modules": {}, "files": {}, "datasets_combined": "separate"}
    ctx.doc = Dup(((key, first[key]), *doc.items()))


def _numeric_paths(ctx: Ctx) -> list[tuple[Any, ...]]:
    doc = _doc(ctx)
    return [p for p in _paths(doc) if type(_get(doc, p)) in (int, float)]


NUMERIC_WHERE = ["any", "shape", "rank", "sequences", "size", "tail", "weight", "alpha", "mc_samples"]


def _numeric_target(ctx: Ctx) -> tuple[Any, ...]:
    where = ctx.pick("where", NUMERIC_WHERE)
    paths = _numeric_paths(ctx)
    if where != "any":
        paths = [p for p in paths if where in p] or paths
    path = ctx.ch.choice(paths)
    ctx.picks.append("at=" + ".".join(map(str, path))[-60:])
    return path


@mutation("manifest.huge_int", 1, weight=1.5)
def _m_huge_int(ctx: Ctx) -> None:
    digits = ctx.pick("digits", [5000, 4301, 400, 20])
    sign = ctx.pick("sign", ["", "-"])
    _set_at(_doc(ctx), _numeric_target(ctx), huge_int(digits, sign))


@mutation("manifest.float_special", 1)
def _m_float_special(ctx: Ctx) -> None:
    value = ctx.pick("value", [1e300, -1e300, -0.0, 1e-320, 5e-324, 1e39, 3.5e38, 1.5, 2.0])
    _set_at(_doc(ctx), _numeric_target(ctx), value)


@mutation("manifest.nan_literal", 1)
def _m_nan_literal(ctx: Ctx) -> None:
    value = ctx.pick("value", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E+2", "0x10", "01"])
    _set_at(_doc(ctx), _numeric_target(ctx), Raw(value))


@mutation("manifest.deep_nesting", 1, weight=1.5)
def _m_deep(ctx: Ctx) -> None:
    kind = ctx.pick("kind", ["array", "object"])
    depth = ctx.pick("depth", [100000, 5000, 900, 100])
    where = ctx.pick("where", ["unknown_field", "software_value", "shape", "revision", "license", "any"])
    doc = _doc(ctx)
    nest = deep(kind, depth)
    if where == "unknown_field":
        doc["x_deep"] = nest
    elif where == "software_value":
        doc["software"] = {"laplace-hub": nest}
    elif where == "shape":
        modules = _modules(doc)
        if not modules:
            raise NotApplicable("no modules")
        ctx.ch.choice(modules)[1]["shape"] = nest
    elif where == "revision":
        if not isinstance(doc.get("base_model"), dict):
            raise NotApplicable("no base_model")
        doc["base_model"]["revision"] = nest
    elif where == "license":
        doc["license"] = nest
    else:
        _set_at(doc, _pick_path(ctx), nest)


SURROGATE = "\ud800"


@mutation("manifest.surrogate", 1, weight=1.5)
def _m_surrogate(ctx: Ctx) -> None:
    where = ctx.pick(
        "where",
        ["module_name", "module_name", "dataset_name", "software_key", "software_value", "unknown_key", "repo_id",
         "tensor_key", "file_name", "license", "description", "init_method"],
    )  # fmt: skip
    lone = ctx.pick("char", [SURROGATE, "\udfff", "\udc80"])
    doc = _doc(ctx)
    if where == "module_name":
        modules = doc.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise NotApplicable("no modules")
        key = ctx.ch.choice(sorted(modules))
        mode = ctx.pick("name", ["lone", "suffix"])
        new = lone if mode == "lone" else key + lone
        doc["modules"] = {(new if k == key else k): v for k, v in modules.items()}
    elif where == "dataset_name":
        datasets = doc.get("datasets")
        if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
            raise NotApplicable("no datasets")
        datasets[0]["name"] = lone
    elif where == "software_key":
        doc["software"] = {lone: "1.0"}
    elif where == "software_value":
        doc["software"] = {"laplace-hub": lone}
    elif where == "unknown_key":
        doc[lone] = 1
    elif where == "repo_id":
        if not isinstance(doc.get("base_model"), dict):
            raise NotApplicable("no base_model")
        doc["base_model"]["repo_id"] = "org/" + lone
    elif where == "tensor_key":
        blocks = _blocks(doc)
        if not blocks:
            raise NotApplicable("no blocks")
        _name, _i, block = ctx.ch.choice(blocks)
        for fld in ("diagonal", "cross_input", "lowrank"):
            if isinstance(block.get(fld), str):
                block[fld] += lone
                return
        for fld in ("input", "output", "a_input"):
            ref = block.get(fld)
            if isinstance(ref, dict):
                k = "key" if "key" in ref else "eigenvalues"
                ref[k] = str(ref[k]) + lone
                return
        raise NotApplicable("no key field")
    elif where == "file_name":
        files = doc.get("files")
        if not isinstance(files, dict) or not files:
            raise NotApplicable("no files")
        key = sorted(files)[0]
        files[key + lone] = files.pop(key)
    elif where == "license":
        doc["license"] = lone
    elif where == "description":
        datasets = doc.get("datasets")
        if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
            raise NotApplicable("no datasets")
        datasets[0]["description"] = lone
    else:
        p = doc.get("parameterization")
        if not isinstance(p, dict) or p.get("kind") != "lora":
            raise NotApplicable("not lora")
        p["init_method"] = lone


@mutation("manifest.long_key", 1)
def _m_long_key(ctx: Ctx) -> None:
    length = ctx.pick("length", [600, 513, 100000])
    where = ctx.pick("where", ["module_name", "tensor_key", "unknown_key", "software_key", "dataset_name", "repo_id"])
    doc = _doc(ctx)
    long = "m" * length
    if where == "module_name":
        modules = doc.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise NotApplicable("no modules")
        key = ctx.ch.choice(sorted(modules))
        doc["modules"] = {(long if k == key else k): v for k, v in modules.items()}
    elif where == "tensor_key":
        blocks = _blocks(doc)
        if not blocks:
            raise NotApplicable("no blocks")
        block = ctx.ch.choice(blocks)[2]
        for fld in ("diagonal", "cross_output"):
            if isinstance(block.get(fld), str):
                block[fld] = long
                return
        for fld in ("output", "b_output"):
            ref = block.get(fld)
            if isinstance(ref, dict):
                ref["key" if "key" in ref else "eigenvectors"] = long
                return
        raise NotApplicable("no key field")
    elif where == "unknown_key":
        doc[long] = 1
    elif where == "software_key":
        doc["software"] = {long: "1"}
    elif where == "dataset_name":
        datasets = doc.get("datasets")
        if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
            raise NotApplicable("no datasets")
        datasets[0]["name"] = long
    else:
        if not isinstance(doc.get("base_model"), dict):
            raise NotApplicable("no base_model")
        doc["base_model"]["repo_id"] = long


def _datasets(doc: Any) -> list[dict[str, Any]]:
    datasets = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(datasets, list):
        return []
    return [d for d in datasets if isinstance(d, dict)]


@mutation("manifest.weight", 1, weight=1.5)
def _m_weight(ctx: Ctx) -> None:
    value = ctx.pick("value", [1e300, 5.0, 0.0, 1e38, 3.5e38, 1e-300, 1e-45])
    which = ctx.pick("which", ["one", "all"])
    datasets = _datasets(_doc(ctx))
    if not datasets:
        raise NotApplicable("no datasets")
    for d in datasets if which == "all" else [ctx.ch.choice(datasets)]:
        d["weight"] = value


@mutation("manifest.summed_weight", 1, weight=1.5)
def _m_summed_weight(ctx: Ctx) -> None:
    """datasets_combined summed, every dataset weight 5: weights do not apply to summed blocks (§5)."""
    value = ctx.pick("value", [5.0, 1e300, 0.0, 0.5])
    doc = _doc(ctx)
    datasets = _datasets(doc)
    if not datasets:
        raise NotApplicable("no datasets")
    if doc.get("datasets_combined") != "summed":
        doc["datasets_combined"] = "summed"
        for _n, _i, block in _blocks(doc):
            block["dataset"] = None
    for d in datasets:
        d["weight"] = value


@mutation("manifest.separate", 1, requires="summed_one")
def _m_separate(ctx: Ctx) -> None:
    """A summed single-dataset artifact stored as separate: now the dataset weight applies."""
    value = ctx.pick("value", [5.0, 1e300, 0.0, 1e38])
    doc = _doc(ctx)
    datasets = _datasets(doc)
    if doc.get("datasets_combined") != "summed" or len(datasets) != 1:
        raise NotApplicable("not one summed dataset")
    doc["datasets_combined"] = "separate"
    for _n, _i, block in _blocks(doc):
        block["dataset"] = datasets[0].get("name")
    datasets[0]["weight"] = value


@mutation("manifest.spec_version", 1, weight=1.5)
def _m_spec_version(ctx: Ctx) -> None:
    value = ctx.pick("value", ["1.0", "1.1", "1.2", "1.99", "2.0", "0.9", "01.1", " 1.1", "1.1\n", "1", 1.1, None,
                               "9999.9999", "1.10000", "١.١", "1.1" + SURROGATE])  # fmt: skip
    _doc(ctx)["spec_version"] = value


@mutation("manifest.structure_rename", 1)
def _m_structure(ctx: Ctx) -> None:
    value = ctx.pick("value", ["diag", "diag_lowrank", "kron", "kron_eig", "kron_tridiag", "future_structure", "KRON",
                               "", None])  # fmt: skip
    blocks = _blocks(_doc(ctx))
    if not blocks:
        raise NotApplicable("no blocks")
    ctx.ch.choice(blocks)[2]["structure"] = value


@mutation("manifest.shape_edit", 1, weight=1.5)
def _m_shape(ctx: Ctx) -> None:
    how = ctx.pick("how", ["swap", "+1", "0", "-1", "2^40", "three", "empty", "string", "float", "true", "1e300"])
    modules = _modules(_doc(ctx))
    if not modules:
        raise NotApplicable("no modules")
    module = ctx.ch.choice(modules)[1]
    shape = module.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)):
        raise NotApplicable("shape not [int, int]")
    d_out, d_in = shape
    module["shape"] = {
        "swap": [d_in, d_out], "+1": [d_out + 1, d_in], "0": [0, d_in], "-1": [-1, d_in], "2^40": [2**40, d_in],
        "three": [d_out, d_in, 1], "empty": [], "string": [str(d_out), d_in], "float": [float(d_out), d_in],
        "true": [True, d_in] if d_out == 1 else [d_out, True], "1e300": [1e300, d_in],
    }[how]  # fmt: skip


@mutation("manifest.rank_edit", 1, weight=1.5)
def _m_rank(ctx: Ctx) -> None:
    doc = _doc(ctx)
    structures = {b.get("structure") for _n, _i, b in _blocks(doc)}
    present = [w for w, ok in (("parameterization", isinstance(doc.get("parameterization"), dict)
                                and "rank" in doc["parameterization"]), ("eigen", "kron_eig" in structures),
                               ("lowrank", "diag_lowrank" in structures)) if ok]  # fmt: skip
    where = ctx.pick("where", present)
    how = ctx.pick("how", ["+1", "-1", "0", "neg", "2^63", "2^64", "float", "huge_int"])
    targets: list[dict[str, Any]] = []
    if where == "parameterization" and isinstance(doc.get("parameterization"), dict):
        targets = [doc["parameterization"]] if "rank" in doc["parameterization"] else []
    elif where == "eigen":
        targets = [b[f] for _n, _i, b in _blocks(doc) for f in ("input", "output") if isinstance(b.get(f), dict)
                   and "rank" in b[f]]  # fmt: skip
    else:
        targets = [b for _n, _i, b in _blocks(doc) if b.get("structure") == "diag_lowrank" and "rank" in b]
    if not targets:
        raise NotApplicable(f"no {where} rank")
    target = ctx.ch.choice(targets)
    r = target["rank"] if type(target["rank"]) is int else 1
    target["rank"] = {
        "+1": r + 1, "-1": r - 1, "0": 0, "neg": -1, "2^63": 2**63, "2^64": 2**64, "float": float(r),
        "huge_int": huge_int(),
    }[how]  # fmt: skip


@mutation("manifest.packed_flip", 1)
def _m_packed(ctx: Ctx) -> None:
    refs = [b[f] for _n, _i, b in _blocks(_doc(ctx))
            for f in ("input", "output", "a_input", "a_output", "b_input", "b_output")
            if isinstance(b.get(f), dict) and "key" in b[f]]  # fmt: skip
    if not refs:
        raise NotApplicable("no factor refs")
    how = ctx.pick("how", ["flip", "flip_all", "string", "int"])
    for ref in refs if how == "flip_all" else [ctx.ch.choice(refs)]:
        ref["packed"] = {"flip": not ref.get("packed", False), "flip_all": not ref.get("packed", False),
                         "string": "true", "int": 1}[how]  # fmt: skip


@mutation("manifest.tail_edit", 1, weight=1.5, requires="eigen")
def _m_tail(ctx: Ctx) -> None:
    value = ctx.pick("value", [1e39, -1.0, 1e300, 3.5e38, 0.0, 1e-45, huge_int(), "1", True, Raw("NaN"),
                               Raw("Infinity"), 2**64])  # fmt: skip
    which = ctx.pick("which", ["one", "all"])
    refs = [b[f] for _n, _i, b in _blocks(_doc(ctx)) for f in ("input", "output")
            if isinstance(b.get(f), dict) and "tail" in b[f]]  # fmt: skip
    if not refs:
        raise NotApplicable("no eigen factor")
    for ref in refs if which == "all" else [ctx.ch.choice(refs)]:
        ref["tail"] = value


@mutation("manifest.files_edit", 1)
def _m_files(ctx: Ctx) -> None:
    how = ctx.pick("how", ["escape", "absolute", "manifest_name", "nul", "missing_shard", "negative_size", "huge_size",
                           "float_size", "upper_sha", "short_sha", "empty", "not_object", "backslash"])  # fmt: skip
    doc = _doc(ctx)
    files = doc.get("files")
    if not isinstance(files, dict):
        raise NotApplicable("no files")
    entry = next(iter(files.values()), {"size": 0, "sha256": "0" * 64})
    key = next(iter(files), None)
    if how in ("escape", "absolute", "manifest_name", "nul", "missing_shard", "backslash"):
        name = {"escape": "../laplace.safetensors", "absolute": "/etc/hostname", "manifest_name": MANIFEST,
                "nul": "laplace.safetensors\u0000", "missing_shard": "laplace-00002-of-00002.safetensors",
                "backslash": "..\\laplace.safetensors"}[how]  # fmt: skip
        files[name] = dict(entry) if isinstance(entry, dict) else entry
    elif how == "empty":
        doc["files"] = {}
    elif how == "not_object":
        doc["files"] = list(files)
    elif key is not None and isinstance(files[key], dict):
        e = files[key]
        if how == "negative_size":
            e["size"] = -1
        elif how == "huge_size":
            e["size"] = 2**64
        elif how == "float_size":
            e["size"] = float(e.get("size", 0))
        elif how == "upper_sha":
            e["sha256"] = str(e.get("sha256", "")).upper()
        else:
            e["sha256"] = str(e.get("sha256", ""))[:63]
    else:
        raise NotApplicable("no file entry")


@mutation("manifest.key_swap", 1)
def _m_key_swap(ctx: Ctx) -> None:
    """Two references exchange their keys (same-shaped ones give a valid but different artifact)."""
    refs = [(b, f) for _n, _i, b in _blocks(_doc(ctx))
            for f in ("input", "output", "a_input", "a_output", "b_input", "b_output")
            if isinstance(b.get(f), dict) and "key" in b[f]]  # fmt: skip
    if len(refs) < 2:
        raise NotApplicable("fewer than two factor refs")
    i = ctx.ch.randint(0, len(refs) - 1)
    j = ctx.ch.randint(0, len(refs) - 1)
    (bi, fi), (bj, fj) = refs[i], refs[j]
    bi[fi]["key"], bj[fj]["key"] = bj[fj]["key"], bi[fi]["key"]


@mutation("manifest.dataset_edit", 1)
def _m_dataset(ctx: Ctx) -> None:
    how = ctx.pick("how", ["tokens_lt_sequences", "duplicate_name", "rename", "drop", "block_dataset", "empty",
                           "huge_counts", "zero_counts"])  # fmt: skip
    doc = _doc(ctx)
    datasets = _datasets(doc)
    if not datasets:
        raise NotApplicable("no datasets")
    d = datasets[0]
    if how == "tokens_lt_sequences":
        d["tokens"] = 1
    elif how == "duplicate_name":
        doc["datasets"] = [*doc["datasets"], dict(d)]
    elif how == "rename":
        d["name"] = "renamed"
    elif how == "drop":
        doc["datasets"] = doc["datasets"][1:]
    elif how == "block_dataset":
        blocks = _blocks(doc)
        if not blocks:
            raise NotApplicable("no blocks")
        ctx.ch.choice(blocks)[2]["dataset"] = "nope"
    elif how == "empty":
        doc["datasets"] = []
    elif how == "huge_counts":
        d["sequences"] = d["tokens"] = d["batches"] = 2**63
    else:
        d["batches"] = 0


@mutation("manifest.param_edit", 1)
def _m_param(ctx: Ctx) -> None:
    how = ctx.pick("how", ["swap_ab", "weight", "lora_A", "lora_AB", "flip_parameterization", "drop_init"])
    doc = _doc(ctx)
    blocks = _blocks(doc)
    if not blocks:
        raise NotApplicable("no blocks")
    if how == "swap_ab":
        for _n, _i, b in blocks:
            if b.get("param") in ("lora_A", "lora_B"):
                b["param"] = "lora_B" if b["param"] == "lora_A" else "lora_A"
    elif how == "flip_parameterization":
        p = doc.get("parameterization")
        if not isinstance(p, dict):
            raise NotApplicable("no parameterization")
        if p.get("kind") == "lora":
            doc["parameterization"] = {"kind": "weight"}
        else:
            doc["parameterization"] = {"kind": "lora", "rank": 2, "alpha": 4.0, "init_method": "gaussian"}
    elif how == "drop_init":
        for _name, module in _modules(doc):
            module.pop("lora_init", None)
    else:
        ctx.ch.choice(blocks)[2]["param"] = how


@mutation("manifest.lora_fields", 1, requires="lora")
def _m_lora(ctx: Ctx) -> None:
    how = ctx.pick("how", ["alpha_1e300", "alpha_0", "alpha_neg", "rslora", "init_dtype_bf16", "init_dtype_bad"])
    p = _doc(ctx).get("parameterization")
    if not isinstance(p, dict) or p.get("kind") != "lora":
        raise NotApplicable("not lora")
    if how.startswith("alpha"):
        p["alpha"] = {"alpha_1e300": 1e300, "alpha_0": 0.0, "alpha_neg": -4.0}[how]
    elif how == "rslora":
        p["use_rslora"] = True
    else:
        p["init_dtype"] = "bfloat16" if how == "init_dtype_bf16" else "int8"


@mutation("manifest.semantics", 1)
def _m_semantics(ctx: Ctx) -> None:
    how = ctx.pick("how", ["kfac_null", "kfac_reduce_per_token", "mc_no_samples", "samples_no_mc", "dtype_f64",
                           "dtype_bad", "format", "loss", "empty_modules", "normalization"])  # fmt: skip
    doc = _doc(ctx)
    if how == "kfac_null":
        doc["kfac_approx"] = None
    elif how == "kfac_reduce_per_token":
        doc["kfac_approx"], doc["normalization"] = "reduce", "per_token"
    elif how == "mc_no_samples":
        doc["estimator"] = {"kind": "mc", "mc_samples": None, "seed": None}
    elif how == "samples_no_mc":
        doc["estimator"] = {"kind": "empirical", "mc_samples": 3, "seed": None}
    elif how == "dtype_f64":
        doc["dtype"] = "float64"
    elif how == "dtype_bad":
        doc["dtype"] = "int8"
    elif how == "format":
        doc["format"] = "laplace_hub"
    elif how == "loss":
        doc["loss"] = "mse"
    elif how == "empty_modules":
        doc["modules"] = {}
    else:
        doc["normalization"] = "per_batch"


@mutation("manifest.unknown_field", 1, weight=0.5)
def _m_unknown(ctx: Ctx) -> None:
    where = ctx.pick("where", ["top", "module", "block", "dataset", "factor_ref"])
    doc = _doc(ctx)
    if where == "top":
        doc["surprise"] = 1
    elif where == "module":
        modules = _modules(doc)
        if not modules:
            raise NotApplicable("no modules")
        ctx.ch.choice(modules)[1]["surprise"] = 1
    elif where == "block":
        blocks = _blocks(doc)
        if not blocks:
            raise NotApplicable("no blocks")
        ctx.ch.choice(blocks)[2]["surprise"] = 1
    elif where == "dataset":
        datasets = _datasets(doc)
        if not datasets:
            raise NotApplicable("no datasets")
        datasets[0]["surprise"] = 1
    else:
        refs = [b[f] for _n, _i, b in _blocks(doc) for f in ("input", "output") if isinstance(b.get(f), dict)]
        if not refs:
            raise NotApplicable("no refs")
        ctx.ch.choice(refs)["surprise"] = 1


@mutation("manifest.lineage_edit", 1, weight=0.5, requires="lineage")
def _m_lineage(ctx: Ctx) -> None:
    how = ctx.pick("how", ["decay_0", "decay_1.5", "drop", "empty", "bad_sha", "add_to_computed"])
    doc = _doc(ctx)
    lineage = doc.get("lineage")
    if how == "add_to_computed":
        if lineage is not None or not _datasets(doc):
            raise NotApplicable("already merged")
        doc["lineage"] = [{"base_model": doc.get("base_model"), "datasets": [d.get("name") for d in _datasets(doc)],
                           "decay": 1.0, "manifest_sha256": "0" * 64, "source": None}]  # fmt: skip
        return
    if not isinstance(lineage, list) or not lineage or not isinstance(lineage[0], dict):
        raise NotApplicable("no lineage")
    if how == "decay_0":
        lineage[0]["decay"] = 0.0
    elif how == "decay_1.5":
        lineage[0]["decay"] = 1.5
    elif how == "drop":
        del doc["lineage"]
    elif how == "empty":
        doc["lineage"] = []
    else:
        lineage[0]["manifest_sha256"] = "xyz"


@mutation("manifest.not_object", 1, weight=0.3)
def _m_not_object(ctx: Ctx) -> None:
    value = ctx.pick("value", [[], None, "laplace", 1, [{"format": "laplace-hub"}]])
    _doc(ctx)
    ctx.doc = Raw(dumps(value))


# ================================================================================================
# stage 2: the manifest bytes
# ================================================================================================


def _manifest_bytes(ctx: Ctx) -> bytes:
    if not is_regular(ctx.manifest):
        raise NotApplicable("no regular laplace.json")
    return ctx.manifest.read_bytes()


@mutation("manifest.truncate", 2)
def _mb_truncate(ctx: Ctx) -> None:
    raw = _manifest_bytes(ctx)
    cut = ctx.ch.randint(0, max(len(raw) - 1, 0))
    ctx.picks.append(f"at={cut}/{len(raw)}")
    ctx.manifest.write_bytes(raw[:cut])


@mutation("manifest.non_utf8", 2)
def _mb_non_utf8(ctx: Ctx) -> None:
    how = ctx.pick("how", ["ff_in_string", "latin1_module", "lone_continuation", "overlong", "cesu_surrogate"])
    raw = _manifest_bytes(ctx)
    bad = {"ff_in_string": b"\xff\xfe", "latin1_module": b"\xe9", "lone_continuation": b"\x80",
           "overlong": b"\xc0\xaf", "cesu_surrogate": b"\xed\xa0\x80"}[how]  # fmt: skip
    marker = b'"model.' if b'"model.' in raw else b'"'
    i = raw.find(marker)
    if i < 0:
        raise NotApplicable("no string")
    ctx.manifest.write_bytes(raw[: i + 1] + bad + raw[i + 1 :])


@mutation("manifest.encoding", 2, weight=0.5)
def _mb_encoding(ctx: Ctx) -> None:
    how = ctx.pick("how", ["bom", "utf16", "utf32", "nul_byte", "empty", "trailing_garbage", "trailing_object",
                           "leading_whitespace_1MiB"])  # fmt: skip
    raw = _manifest_bytes(ctx)
    try:
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise NotApplicable("not UTF-8 already") from e
    out = {
        "bom": lambda: b"\xef\xbb\xbf" + raw,
        "utf16": lambda: text.encode("utf-16", "surrogatepass"),
        "utf32": lambda: text.encode("utf-32", "surrogatepass"),
        "nul_byte": lambda: raw[: len(raw) // 2] + b"\x00" + raw[len(raw) // 2 :],
        "empty": lambda: b"",
        "trailing_garbage": lambda: raw + b"x",
        "trailing_object": lambda: raw + b"{}",
        "leading_whitespace_1MiB": lambda: b" " * 2**20 + raw,
    }[how]()
    ctx.manifest.write_bytes(out)


# ================================================================================================
# stage 3: the file system
# ================================================================================================


def _fs_target(ctx: Ctx, kinds: Sequence[str]) -> Path:
    kind = ctx.pick("target", list(kinds))
    if kind == "tensor":
        files = ctx.tensor_files()
        if not files:
            raise NotApplicable("no tensor file")
        return ctx.folder / ctx.ch.choice(files)
    name = {"manifest": MANIFEST, "index": INDEX, "readme": README}[kind]
    path = ctx.folder / name
    if kind in ("index",) and not is_regular(path):
        raise NotApplicable("not sharded")
    return path


def _replace(path: Path) -> None:
    """Remove whatever is at ``path`` (file, symlink, FIFO, directory), if anything."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _set_file_entry(ctx: Ctx, name: str, size: int, sha: str | None) -> None:
    def fn(doc: Any) -> None:
        files = doc.get("files") if isinstance(doc, dict) else None
        if isinstance(files, dict) and isinstance(files.get(name), dict):
            files[name]["size"] = size
            if sha is not None:
                files[name]["sha256"] = sha

    ctx.try_edit_manifest(fn)


@mutation("fs.symlink_sibling", 3)
def _fs_symlink_sibling(ctx: Ctx) -> None:
    """A tensor file replaced by a symlink: to its own content under a hidden name, or to another file."""
    how = ctx.pick("how", ["hidden_copy", "other_file"])
    path = _fs_target(ctx, ["tensor"])
    if how == "hidden_copy":
        hidden = path.with_name("." + path.name + ".real")
        path.rename(hidden)
        path.symlink_to(hidden.name)
        return
    others = [p for p in sorted(ctx.folder.iterdir()) if p != path and is_regular(p)]
    if not others:
        raise NotApplicable("no other file")
    target = ctx.ch.choice(others)
    path.unlink()
    path.symlink_to(target.name)
    _set_file_entry(ctx, path.name, target.stat().st_size, sha256_file(target))


@mutation("fs.symlink_outside", 3, weight=1.5)
def _fs_symlink_outside(ctx: Ctx) -> None:
    target = ctx.pick("to", ["/etc/hostname", "/proc/self/mem", "/proc/self/mem", "/dev/zero", "/dev/urandom",
                             "/nonexistent", "loop", "folder"])  # fmt: skip
    path = _fs_target(ctx, ["tensor", "manifest", "index", "readme"])
    _replace(path)
    if target == "loop":
        path.symlink_to(path.name)
    elif target == "folder":
        path.symlink_to(".")
    else:
        path.symlink_to(target)
    if path.name == MANIFEST or not target.startswith("/"):
        return
    if target == "/etc/hostname" and os.path.isfile(target):
        _set_file_entry(ctx, path.name, os.path.getsize(target), sha256_file(Path(target)))
    elif target == "/proc/self/mem":
        _set_file_entry(ctx, path.name, 0, None)  # stat says 0 bytes: a size check passes, hashing reads


@mutation("fs.fifo", 3)
def _fs_fifo(ctx: Ctx) -> None:
    path = _fs_target(ctx, ["tensor", "manifest", "index", "readme"])
    _replace(path)
    os.mkfifo(path)


@mutation("fs.directory", 3)
def _fs_directory(ctx: Ctx) -> None:
    path = _fs_target(ctx, ["tensor", "manifest", "index", "readme"])
    _replace(path)
    path.mkdir()
    (path / "laplace.safetensors").write_bytes(b"")


@mutation("fs.stray", 3, weight=0.5)
def _fs_stray(ctx: Ctx) -> None:
    how = ctx.pick("how", ["hidden_file", "hidden_dir", "visible", "tmp_sibling", "stray_fifo", "readme"])
    if how == "hidden_file":
        (ctx.folder / ".DS_Store").write_bytes(b"\x00" * 16)
    elif how == "hidden_dir":
        (ctx.folder / ".cache" / "huggingface").mkdir(parents=True)
        (ctx.folder / ".cache" / "huggingface" / "x.lock").write_bytes(b"")
    elif how == "visible":
        (ctx.folder / "notes.bin").write_bytes(b"\x00" * 8)
    elif how == "tmp_sibling":
        (ctx.folder / "laplace.safetensors.tmp").write_bytes(b"\x00" * 8)
    elif how == "stray_fifo":
        os.mkfifo(ctx.folder / "pipe")
    else:
        if os.path.lexists(ctx.folder / README) and not is_regular(ctx.folder / README):
            raise NotApplicable("README.md is not a regular file")
        (ctx.folder / README).write_text("---\nlicense: apache-2.0\n---\n# card " + "\U0001f600\n")


@mutation("fs.chmod000", 3, weight=0.3)
def _fs_chmod(ctx: Ctx) -> None:
    """Unreadable permissions (as root this has no effect: kept for completeness, expect nothing)."""
    path = _fs_target(ctx, ["tensor", "manifest"])
    if not path.exists():
        raise NotApplicable("missing")
    path.chmod(0)


@mutation("fs.sparse_manifest", 3, weight=0.3)
def _fs_sparse_manifest(ctx: Ctx) -> None:
    """laplace.json (or the index) one byte above the 64 MiB limit, as a sparse file of NULs."""
    path = _fs_target(ctx, ["manifest", "index"])
    if not is_regular(path):
        raise NotApplicable("missing")
    with path.open("r+b") as f:
        f.truncate(64 * 2**20 + 1)


SPARSE_SHAPES = {"3GiB": (24576, 32768), "50GiB": (131072, 102400)}


@mutation("fs.sparse_huge", 3, weight=0.15, expensive=True, requires="diag_weight")
def _fs_sparse_huge(ctx: Ctx) -> None:
    """A diag module declared (header + manifest) with a huge shape, its data a sparse hole."""
    size = ctx.pick("size", ["3GiB", "50GiB"])
    doc = ctx.load_manifest()
    if not is_regular(ctx.folder / SINGLE) or not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise NotApplicable("not a single-file artifact")
    diag_modules = [name for name, m in _modules(doc)
                    if all(isinstance(b, dict) and b.get("structure") == "diag" and b.get("param") == "weight"
                           for b in m.get("blocks", [None]))]  # fmt: skip
    refs = [r for r in key_refs(doc) if r.module in diag_modules and r.role == "diagonal"]
    keys = {r.key for r in refs}
    if not refs or any(r.key in keys and r.module not in diag_modules for r in key_refs(doc)):
        raise NotApplicable("no weight diag module")
    ref = ctx.ch.choice(refs)
    d_out, d_in = SPARSE_SHAPES[size]
    path = ctx.folder / SINGLE
    header, data = read_st(path)
    entries = tensor_entries(header)
    if ref.key not in dict(entries) or header[ref.key].get("dtype") != "F32":
        raise NotApplicable("not a float32 diag")
    out, new_data = {"__metadata__": header.get("__metadata__", {})}, b""
    for key, entry in entries:
        if key == ref.key:
            continue
        a, b = entry["data_offsets"]
        out[key] = {**entry, "data_offsets": [len(new_data), len(new_data) + b - a]}
        new_data += data[a:b]
    nbytes = d_out * d_in * 4
    out[ref.key] = {"dtype": "F32", "shape": [d_out, d_in], "data_offsets": [len(new_data), len(new_data) + nbytes]}
    write_st(path, out, new_data)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + nbytes)
    total = path.stat().st_size
    sha = sha256_file(path) if size == "3GiB" else "0" * 64  # hashing 50 GiB takes a minute: left wrong
    doc["modules"][ref.module]["shape"] = [d_out, d_in]
    doc["files"][SINGLE] = {"size": total, "sha256": sha}
    ctx.save_manifest(doc)


# ================================================================================================
# cases
# ================================================================================================


def vectors(kind: str | None = None, versions: Sequence[str] | None = None) -> list[str]:
    """Conformance vectors as ``<version>/<valid|invalid>/<name>`` (only of ``versions`` when given)."""
    out = []
    for path in sorted(CONFORMANCE.glob("*/*/*")):
        if not path.is_dir() or path.parent.name not in ("valid", "invalid"):
            continue
        if (kind is None or path.parent.name == kind) and (not versions or path.parent.parent.name in versions):
            out.append(str(path.relative_to(CONFORMANCE)))
    return out


_FEATURES: dict[str, frozenset[str]] = {}


def vector_features(vector: str) -> frozenset[str]:
    """What a vector holds that some mutations need: eigen, tridiag, index, lora, lineage, diag_weight, summed_one."""
    if vector not in _FEATURES:
        folder = CONFORMANCE / vector
        try:
            doc = load_json(folder / MANIFEST)
        except NotApplicable:
            doc = None
        refs = key_refs(doc)
        found = {r.role for r in refs}
        features = set()
        if "eigenvalues" in found:
            features.add("eigen")
        if "cross" in found:
            features.add("tridiag")
        if (folder / INDEX).is_file():
            features.add("index")
        if isinstance(doc, dict):
            kind = (
                doc.get("parameterization", {}).get("kind") if isinstance(doc.get("parameterization"), dict) else None
            )
            if kind == "lora":
                features.add("lora")
            if doc.get("lineage") is not None:
                features.add("lineage")
            if doc.get("datasets_combined") == "summed" and len(_datasets(doc)) == 1:
                features.add("summed_one")
            diag = any(b.get("structure") == "diag" and b.get("param") == "weight" for _n, _i, b in _blocks(doc))
            if diag and (folder / SINGLE).is_file():
                features.add("diag_weight")
        _FEATURES[vector] = frozenset(features)
    return _FEATURES[vector]


def _pick_vector(ch: Chooser, kind: str, requires: list[str], versions: Sequence[str] | None = None) -> str:
    """A vector of ``kind`` that has what the drawn mutations need (as much of it as any vector has)."""
    for need in (set(requires), set(requires[:1]), set()):
        for pool in (vectors(kind, versions), vectors(None, versions)):
            fitting = [v for v in pool if need <= vector_features(v)]
            if fitting:
                return ch.choice(fitting)
    raise HarnessError("no conformance vectors")


@dataclass
class Case:
    """One mutated copy of a conformance vector."""

    folder: Path  # the artifact folder
    work: Path  # the case's private scratch folder (holds `folder`)
    vector: str
    mutations: list[str]  # labels: name(picks)
    refreshed: bool
    seed: int | None = None
    skipped: list[str] = field(default_factory=list)
    expect_valid: bool = False  # SPEC.md says the case is valid (a large case of a valid family)

    @property
    def names(self) -> list[str]:
        return [base_name(m) for m in self.mutations]

    @property
    def families(self) -> list[str]:
        return sorted({family_of(m) for m in self.mutations})

    def describe(self) -> str:
        seed = f"seed={self.seed} " if self.seed is not None else ""
        muts = ", ".join(self.mutations) or "none"
        return f"{seed}vector={self.vector} mutations=[{muts}] refreshed={self.refreshed}"

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "vector": self.vector, "mutations": self.mutations, "refreshed": self.refreshed}


MutationSpec = str | tuple[str, dict[str, Any]]


def _eligible(include_expensive: bool) -> list[Mutation]:
    return [m for m in REGISTRY.values() if include_expensive or not m.expensive]


def make_case(
    work: Path,
    seed: int | None = None,
    *,
    chooser: Chooser | None = None,
    vector: str | None = None,
    mutations: Sequence[MutationSpec] | None = None,
    refresh: bool | None = None,
    include_expensive: bool = True,
    versions: Sequence[str] | None = None,
    large: float = 0.0,
) -> Case:
    """Copy a vector into ``work/artifact`` and mutate it.

    Args:
        work: An empty (or absent) scratch folder for this case; the artifact goes to ``work/artifact``.
        seed: Seed of every random choice (when no ``chooser`` is given).
        chooser: Where the choices come from (e.g. :class:`DataChooser`).
        vector: Force the vector (``"1.0/valid/weight-kron"``).
        mutations: Force the mutations, as names or ``(name, {param: value})``; each must apply.
        refresh: Force whether checksums are refreshed after the file mutations.
        include_expensive: Allow mutations flagged expensive (sparse GiB files).
        versions: Draw vectors only from these spec versions (folders of spec/conformance).
        large: The probability of a case built at realistic sizes instead (``large.py``); with 0,
            no choice is spent on it, so that seeds of earlier runs rebuild the same cases.

    """
    ch = chooser or RandomChooser(seed if seed is not None else 0)
    if large and mutations is None and vector is None and ch.coin(large):
        label, expect_valid = write_large(work / "artifact", ch)
        return Case(work / "artifact", work, "large", [label], True, seed, expect_valid=expect_valid)
    kind = "valid" if ch.coin(VALID_PROBABILITY) else "invalid"
    forced = mutations is not None
    if forced:
        plan: list[tuple[Mutation, dict[str, Any]]] = []
        for spec in mutations or []:
            name, params = (spec, {}) if isinstance(spec, str) else spec
            if name not in REGISTRY:
                raise HarnessError(f"no mutation {name!r}")
            plan.append((REGISTRY[name], params))
    else:
        pool = _eligible(include_expensive)
        count = ch.randint(1, 3)
        plan = []
        for _ in range(count):
            if isinstance(ch, RandomChooser):
                plan.append((ch.weighted(pool, [m.weight for m in pool]), {}))
            else:
                plan.append((REGISTRY[ch.choice([m.name for m in pool])], {}))
    if vector is None:
        vector = _pick_vector(ch, kind, [m.requires for m, _ in plan if m.requires], versions)
    source = CONFORMANCE / vector
    if not source.is_dir():
        raise HarnessError(f"no conformance vector {vector}")
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "artifact"
    shutil.copytree(source, folder, symlinks=True)
    if refresh is None:
        refresh = ch.coin(REFRESH_PROBABILITY)
    plan.sort(key=lambda mp: mp[0].stage)
    applied: list[str] = []
    skipped: list[str] = []
    refreshed = False
    ctx = Ctx(folder, ch)
    stage = 0
    for mut, params in plan:
        if stage == 0 and mut.stage >= 1:
            refreshed = refresh and refresh_checksums(folder)
            ctx.doc = _load_doc(ctx)
            stage = 1
        if stage == 1 and mut.stage >= 2:
            _save_doc(ctx)
            stage = 2
        label = _apply(ctx, mut, params, forced)
        if label is None and not forced:
            # try other mutations of the same stage, so that most cases carry as many as drawn
            same = [m.name for m in _eligible(include_expensive) if m.stage == mut.stage]
            for _attempt in range(4):
                label = _apply(ctx, REGISTRY[ch.choice(same)], {}, False)
                if label is not None:
                    break
        if label is None:
            skipped.append(mut.name)
        else:
            applied.append(label)
    if stage == 0:
        refreshed = refresh and refresh_checksums(folder)
    elif stage == 1:
        _save_doc(ctx)
    return Case(folder, work, vector, applied, bool(refreshed), seed, skipped)


def _load_doc(ctx: Ctx) -> Any:
    try:
        return ctx.load_manifest()
    except NotApplicable:
        return None


def _save_doc(ctx: Ctx) -> None:
    if ctx.doc is not None:
        ctx.save_manifest(ctx.doc)


def _apply(ctx: Ctx, mut: Mutation, params: dict[str, Any], forced: bool) -> str | None:
    ctx.forced, ctx.picks = params, []
    backup = _snapshot(ctx.doc) if mut.stage == 1 else None
    try:
        try:
            mut.fn(ctx)
        except RecursionError as e:  # a document too deep for this module's recursive walks
            raise NotApplicable("nested too deep") from e
    except NotApplicable as e:
        if mut.stage == 1:
            ctx.doc = backup
        if forced:
            raise HarnessError(f"forced mutation {mut.name} does not apply: {e}") from e
        return None
    except Exception as e:
        raise HarnessError(f"mutation {mut.name}({', '.join(ctx.picks)}) failed: {type(e).__name__}: {e}") from e
    return f"{mut.name}({', '.join(ctx.picks)})" if ctx.picks else mut.name


def _snapshot(doc: Any) -> Any:
    """A deep copy of a manifest document (Raw/Dup are immutable and shared)."""
    if isinstance(doc, dict):
        return {k: _snapshot(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_snapshot(v) for v in doc]
    return doc


def draw_case(data: Any, work: Path, *, include_expensive: bool = False) -> Case:
    """A case whose every choice is a hypothesis draw."""
    return make_case(work, chooser=DataChooser(data), include_expensive=include_expensive)


def main() -> None:
    """``python -m tests.fuzz.mutate SEED OUT``: write one case's folder (to look at it by hand)."""
    import sys

    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    case = make_case(out, seed=seed)
    print(case.describe())
    print(case.folder)


if __name__ == "__main__":
    main()
