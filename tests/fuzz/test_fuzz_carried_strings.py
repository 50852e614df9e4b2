"""Any string an accepted artifact carries flows through every consumer without an exception.

A valid artifact's free-form strings (base model repo id and revision, dataset source and
description, software, license, lineage, module names, unknown fields of a newer minor) are drawn
from arbitrary text: control characters, bidi overrides, NUL, backslashes, quotes, line breaks,
YAML and Markdown syntax, strings at the manifest's length limits. The regularizer, the adapter's
provenance (file and model card), the artifact's model card and ``inspect`` (text and ``--json``)
must all succeed; data keeps the strings exactly, and what a person sees holds no control character.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_args

import pytest
import torch
import yaml
from annotated_types import MaxLen
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, TypeAdapter, ValidationError

from laplace_hub.artifact import Artifact
from laplace_hub.cli import main
from laplace_hub.consumers import LaplaceRegularizer, read_provenance, write_provenance
from laplace_hub.hub.card import build_card, card_metadata
from laplace_hub.manifest import (
    MANIFEST_NAME,
    SINGLE_FILE_NAME,
    SPEC_VERSION,
    BaseModelInfo,
    DatasetInfo,
    LineageEntry,
    Manifest,
    parse_version,
)
from laplace_hub.validate import validate
from tests.conftest import save_tiny_artifact, tiny_llama

TARGETS = ["q_proj", "v_proj"]
REPORTED = "\u202e\\\x00"  # issue 20: a base model repo id that crashed LaplaceRegularizer.from_artifact
MAJOR, MINOR = parse_version(SPEC_VERSION)
NEWER_MINOR = f"{MAJOR}.{MINOR + 1}"


def accepts(annotation: Any) -> Any:
    """Whether the manifest's models accept a string as ``annotation`` (the strings drawn are those)."""
    adapter = TypeAdapter(annotation)

    def ok(text: str) -> bool:
        try:
            adapter.validate_python(text, strict=True)
        except ValidationError:
            return False
        return True

    return ok


NASTY = (
    "\x00\x01\x1b\x7f\x85\x9b\t\n\r\\\"'`|<>#*_[]{}:-?&!%@$~ \xa0\u200b\u200d\u202e\u2066\u2028\u2029\ufeff\U0001f600"
)
CHARS = st.one_of(st.characters(codec="utf-8"), st.sampled_from(NASTY))
SPECIAL = [
    REPORTED,
    "---",
    "a\n---\nb",
    "<!-- /laplace-hub provenance -->",
    "null",
    "1.0",
    "~",
    " padded ",
    "'\"",
    "\x1b[2J\x1b[31mred",
    "line\r\nbreak",
    "`code` ```fence```",
    "[link](javascript:alert(1)) <img src=x>",
    "| a | b |",
    "\u2028\u2029\x85",
]


def carried(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Arbitrary text of at most ``max_size`` characters: short, at the limit, or a known hard case."""
    return st.one_of(
        st.text(CHARS, min_size=min_size, max_size=min(max_size, 24)),
        st.text(CHARS, min_size=1, max_size=8).map(lambda s: (s * max_size)[:max_size]),
        st.sampled_from([s for s in SPECIAL if min_size <= len(s) <= max_size]),
    )


def field_accepts(model: type[BaseModel], name: str) -> Any:
    """Whether the manifest's models accept a string in this field (its constraints, not its None)."""
    return accepts(Annotated[(str, *model.model_fields[name].metadata)])


def field_text(model: type[BaseModel], name: str) -> st.SearchStrategy[str]:
    """Any text the manifest accepts in a string field, up to its own length limit (kept in step with manifest.py)."""
    size = next((m.max_length for m in model.model_fields[name].metadata if isinstance(m, MaxLen)), 256)
    return carried(size).filter(field_accepts(model, name))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | carried(64),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(carried(16), inner, max_size=3),
    max_leaves=6,
)


@dataclass
class Strings:
    """The strings one artifact carries."""

    repo_id: str = "me/tiny"
    revision: str | None = None
    dataset: str = "src"
    source: str | None = None
    description: str | None = None
    software: dict[str, str] = field(default_factory=dict)
    license: str | None = None
    lineage_repo_id: str = "me/tiny"
    lineage_revision: str | None = None
    lineage_source: str | None = None
    module: str | None = None  # an extra module, not in the model: a name that is only logged
    unknown: dict[str, Any] | None = None  # fields of a newer minor (NEWER_MINOR), at three levels


def _unknown(model: type[BaseModel]) -> st.SearchStrategy[str]:
    return carried(32, min_size=1).filter(lambda k: k not in model.model_fields)


MODULE_NAME = get_args(Manifest.model_fields["modules"].annotation)[0]
SOFTWARE_KEY, SOFTWARE_VALUE = get_args(Manifest.model_fields["software"].annotation)


STRINGS = st.builds(
    Strings,
    repo_id=field_text(BaseModelInfo, "repo_id"),
    revision=st.none() | field_text(BaseModelInfo, "revision"),
    dataset=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}", fullmatch=True).filter(
        field_accepts(DatasetInfo, "name")
    ),
    source=st.none() | field_text(DatasetInfo, "source"),
    description=st.none() | field_text(DatasetInfo, "description"),
    software=st.dictionaries(
        carried(48).filter(accepts(SOFTWARE_KEY)), carried(48).filter(accepts(SOFTWARE_VALUE)), max_size=3
    ),
    license=st.none() | field_text(Manifest, "license"),
    lineage_repo_id=field_text(BaseModelInfo, "repo_id"),
    lineage_revision=st.none() | field_text(BaseModelInfo, "revision"),
    lineage_source=st.none() | field_text(LineageEntry, "source"),
    module=st.none() | carried(96).filter(accepts(MODULE_NAME)),
    unknown=st.none()
    | st.fixed_dictionaries(
        {
            "manifest": st.dictionaries(_unknown(Manifest), JSON, min_size=1, max_size=2),
            "base_model": st.dictionaries(_unknown(BaseModelInfo), JSON, min_size=1, max_size=2),
            "dataset": st.dictionaries(_unknown(DatasetInfo), JSON, min_size=1, max_size=2),
        }
    ),
)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama().float()


@pytest.fixture(scope="module")
def computed(base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    """A tiny computed artifact: its manifest (to rewrite) and its tensor file (unchanged)."""
    folder = save_tiny_artifact(base, tmp_path_factory.mktemp("computed") / "prior", TARGETS)
    return json.loads((folder / MANIFEST_NAME).read_text()), (folder / SINGLE_FILE_NAME).read_bytes()


@pytest.fixture(scope="module")
def peft_model(base: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(base), config)


def write_artifact(folder: Path, computed: tuple[dict[str, Any], bytes], s: Strings) -> dict[str, Any]:
    """A valid artifact (with lineage: spec ≥ 1.1; of a newer minor with unknown fields) carrying ``s``."""
    manifest, tensors = computed
    m = copy.deepcopy(manifest)
    m["spec_version"] = max(manifest["spec_version"], "1.1", key=parse_version) if s.unknown is None else NEWER_MINOR
    m["base_model"].update(repo_id=s.repo_id, revision=s.revision)
    m["datasets"][0].update(name=s.dataset, source=s.source, description=s.description)
    m["datasets_combined"] = "separate"  # a continual posterior's: each block names its dataset
    for module in m["modules"].values():
        for block in module["blocks"]:
            block["dataset"] = s.dataset
    if s.module is not None and s.module not in m["modules"]:
        m["modules"][s.module] = copy.deepcopy(next(iter(m["modules"].values())))  # shares its tensors
        m["base_model"]["fingerprint"] = None  # of the computed modules: it would not cover this one
    m["software"], m["license"] = s.software, s.license
    lineage_base = {"repo_id": s.lineage_repo_id, "revision": s.lineage_revision}
    m["lineage"] = [
        {"base_model": lineage_base, "datasets": [s.dataset], "decay": 0.5, "manifest_sha256": "ab" * 32}
        | {"source": s.lineage_source}
    ]
    if s.unknown is not None:
        m |= s.unknown["manifest"]
        m["base_model"] |= s.unknown["base_model"]
        m["datasets"][0] |= s.unknown["dataset"]
    folder.mkdir()
    (folder / SINGLE_FILE_NAME).write_bytes(tensors)
    (folder / MANIFEST_NAME).write_text(json.dumps(m))
    return m


def front_matter(card: str) -> Any:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 3)])


def printable(text: str) -> bool:
    """No control character, line separator, bidi override or other invisible character on any line."""
    return all(line.isprintable() for line in text.split("\n"))


def inspect(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", *argv]) == 0
    return out.getvalue()


class _Strict(logging.Handler):
    """Formats every record at once, so that a message that cannot be formatted raises in the test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@example(s=Strings(repo_id=REPORTED))
@example(
    s=Strings(
        repo_id=REPORTED,
        revision=REPORTED,
        source=REPORTED,
        description=REPORTED,
        software={REPORTED: REPORTED},
        license=REPORTED,
        lineage_source=REPORTED,
        module=REPORTED if accepts(MODULE_NAME)(REPORTED) else "\u202e\\",  # spec 1.3: no control character
    )
)
@given(s=STRINGS)
def test_carried_strings_reach_every_consumer(
    s: Strings, computed: tuple[dict[str, Any], bytes], peft_model: torch.nn.Module
) -> None:
    logger, handler = logging.getLogger("laplace_hub"), _Strict()
    logger.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a newer minor's unknown fields are a warning
            _check(Path(tmp), s, computed, peft_model)
    finally:
        logger.removeHandler(handler)
    assert all(printable(line) for line in handler.lines)


def _check(root: Path, s: Strings, computed: tuple[dict[str, Any], bytes], peft_model: torch.nn.Module) -> None:
    manifest = write_artifact(root / "prior", computed, s)
    report = validate(root / "prior")
    assert report.valid, [f.line() for f in report.errors]  # an accepted artifact
    artifact = Artifact.open(root / "prior")

    # the regularizer, and the adapter's provenance: the record keeps the strings exactly
    reg = LaplaceRegularizer.from_artifact(artifact, peft_model, strength=3.0)
    assert math.isfinite(float(reg()))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "README.md").write_text("---\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Model Card\n")
    write_provenance(adapter, reg)
    record = write_provenance(adapter, reg)  # a second save replaces the record
    assert record.artifact is not None
    assert (record.artifact.base_model, record.artifact.base_model_revision) == (s.repo_id, s.revision)
    assert read_provenance(adapter) == record
    card = (adapter / "README.md").read_text()
    metadata = front_matter(card)
    assert metadata["laplace_hub"] == record.model_dump(mode="json") and metadata["library_name"] == "peft"
    assert card.count("## Laplace prior") == 1 and card.count("<!-- laplace-hub provenance -->") == 1
    assert printable(card)

    # the artifact's model card: the front matter loads back to the same values
    hub_card = build_card(artifact, "me/prior", "sub folder")
    assert front_matter(hub_card) == card_metadata(artifact)
    assert front_matter(hub_card)["base_model"] == s.repo_id and printable(hub_card)

    # inspect: text escaped, JSON exact
    assert printable(inspect(str(root / "prior")))
    summary = json.loads(inspect(str(root / "prior"), "--json"))
    m = artifact.manifest
    assert summary["base_model"] == m.base_model.model_dump(mode="json")
    assert summary["datasets"] == [d.model_dump(mode="json") for d in m.datasets]
    assert summary["lineage"] == [e.model_dump(mode="json") for e in m.lineage or []]
    assert (summary["base_model"]["repo_id"], summary["base_model"]["revision"]) == (s.repo_id, s.revision)
    assert (summary["datasets"][0]["source"], summary["datasets"][0]["description"]) == (s.source, s.description)
    assert (summary["software"], summary["license"]) == (s.software, s.license)
    assert summary["lineage"][0]["base_model"]["repo_id"] == s.lineage_repo_id
    assert summary["lineage"][0]["source"] == s.lineage_source and set(summary["modules"]) == set(manifest["modules"])
    assert printable(inspect(str(adapter)))
    assert json.loads(inspect(str(adapter), "--json"))["provenance"] == record.model_dump(mode="json")


def test_the_reported_case_as_it_was_found(computed: tuple[dict[str, Any], bytes], peft_model: torch.nn.Module) -> None:
    """Issue 20: ``'\\u202e\\\\\\x00'`` as ``base_model.repo_id`` ended in a pydantic ValidationError."""
    with tempfile.TemporaryDirectory() as tmp:
        write_artifact(Path(tmp) / "prior", computed, Strings(repo_id=REPORTED))
        reg = LaplaceRegularizer.from_artifact(Artifact.open(Path(tmp) / "prior"), peft_model, strength=1.0)
    assert reg.source is not None and reg.source.base_model == REPORTED
