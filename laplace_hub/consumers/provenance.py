"""Which prior an adapter was trained under, saved beside it so that a published fine-tune says so.

A regularizer remembers the artifact it was built from (:class:`ArtifactSource`); saving the
adapter writes :data:`PROVENANCE_FILE` next to ``adapter_config.json`` (a small versioned JSON
record, :class:`Provenance`) and adds the same record to the model card's YAML metadata under
``laplace_hub:``, with a short section in its text. ``laplace-hub inspect ADAPTER_DIR`` reads it
back with :func:`read_provenance`, which treats the folder as hostile: bounded, strict, one-line
errors.

The strings an artifact carries (its base model's repo id and revision) are recorded as they are,
whatever text the manifest accepts: the record is data. Where it is shown (the card's text,
``inspect``) they go through :mod:`laplace_hub.text`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import MaxLen
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from laplace_hub.artifact import Artifact
from laplace_hub.artifact.files import MAX_MANIFEST_BYTES, open_regular, read_json_bounded, regular_size
from laplace_hub.errors import LaplaceHubError, ProvenanceError
from laplace_hub.manifest import MANIFEST_NAME, BaseModelInfo, first_problem
from laplace_hub.text import front_matter, markdown_code

if TYPE_CHECKING:
    from laplace_hub.consumers.regularizer import LaplaceRegularizer

logger = logging.getLogger(__name__)
PROVENANCE_FILE = "laplace_provenance.json"
"""The record's file name, beside ``adapter_config.json``."""
PROVENANCE_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
CARD_FILE = "README.md"
MAX_PROVENANCE_BYTES = 64 * 2**10
MAX_CARD_BYTES = 2**20
_BEGIN, _END = "<!-- laplace-hub provenance -->", "<!-- /laplace-hub provenance -->"

# laplace-hub's own words (versions, names from code): one line each, no control characters
Text = Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
MAX_ORIGIN_LENGTH = 512


def _max_length(field: str) -> int:
    """The manifest's own limit on a field of ``base_model``: what it accepts, a record accepts."""
    return next(m.max_length for m in BaseModelInfo.model_fields[field].metadata if isinstance(m, MaxLen))


# Strings an artifact or its origin carries, kept exactly: any text, control characters included
# (`inspect` and the card show them escaped). Bounded so that a record stays far below 64 KiB.
Carried = Annotated[str, StringConstraints(max_length=MAX_ORIGIN_LENGTH)]
BaseModelId = Annotated[str, StringConstraints(max_length=_max_length("repo_id"))]
BaseModelRevision = Annotated[str, StringConstraints(max_length=_max_length("revision"))]


class _Record(BaseModel):
    # unknown keys are ignored: a later laplace-hub may add fields without a new provenance_version
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class ArtifactSource(_Record):
    """The artifact a regularizer was built from: where it came from and what it held."""

    repo_id: Carried | None = Field(None, description="the repo it was pulled from")
    revision: Carried | None = Field(None, description="the resolved commit (a local hub: the sha256 of laplace.json)")
    subfolder: Carried | None = None
    path: Carried | None = Field(
        None, description="the name of the folder it was opened from, when not pulled (no local path is published)"
    )
    manifest_sha256: Sha256 | None = Field(None, description="sha256 of laplace.json's bytes; none in memory")
    spec_version: Text
    structures: list[Text] = Field(max_length=64)
    parameterization: Text
    normalization: Text
    base_model: BaseModelId = Field(description="the manifest's base_model.repo_id, as it is")
    base_model_revision: BaseModelRevision | None = None


class Provenance(_Record):
    """What ``laplace_provenance.json`` holds (``provenance_version`` 1)."""

    provenance_version: int = Field(default=PROVENANCE_VERSION, ge=1)
    laplace_hub_version: Text
    prior: Literal["artifact", "identity", "custom"]
    artifact: ArtifactSource | None = None
    mode: Literal["weight", "lora_init"]
    strength: float = Field(ge=0)
    adapter: Text
    modules: int = Field(ge=0)


def artifact_source(artifact: Artifact) -> ArtifactSource:
    """Record an artifact's origin (a pull's repo and resolved revision, or its folder) and contents."""
    m = artifact.manifest
    origin = artifact.origin  # set by a pull: repo_id, revision, subfolder
    repo_id = _origin(getattr(origin, "repo_id", None))
    return ArtifactSource(
        repo_id=repo_id,
        revision=_origin(getattr(origin, "revision", None)),
        subfolder=_origin(getattr(origin, "subfolder", None) or None),
        path=None if repo_id is not None or artifact.path is None else _origin(Path(artifact.path).name),
        manifest_sha256=_manifest_sha256(artifact.path),
        spec_version=m.spec_version,
        structures=sorted({b.structure for module in m.modules.values() for b in module.blocks}),
        parameterization=m.parameterization.kind,
        normalization=m.normalization,
        base_model=m.base_model.repo_id,
        base_model_revision=m.base_model.revision,
    )


def _origin(text: str | None) -> str | None:
    r"""A name from the file system or the command line as a record holds it: Unicode, bounded.

    Undecodable bytes of a folder name (surrogate escapes) become ``\xNN``; a name longer than
    :data:`MAX_ORIGIN_LENGTH` is cut, ending in ``…``.
    """
    if text is None:
        return None
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text if len(text) <= MAX_ORIGIN_LENGTH else text[: MAX_ORIGIN_LENGTH - 1] + "…"


def _manifest_sha256(folder: Path | None) -> str | None:
    if folder is None:
        return None
    try:
        with open_regular(folder / MANIFEST_NAME) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except (OSError, LaplaceHubError) as e:
        logger.warning("cannot hash %s for the adapter's provenance: %s", folder / MANIFEST_NAME, e)
        return None
    return hashlib.sha256(raw).hexdigest() if len(raw) <= MAX_MANIFEST_BYTES else None


def provenance(regularizer: LaplaceRegularizer) -> Provenance:
    """The record of a regularizer as it is now (its current ``strength`` and ``mode``)."""
    try:
        ours = version("laplace-hub")
    except PackageNotFoundError:  # run from a source tree that is not installed
        ours = "unknown"
    return Provenance(
        laplace_hub_version=ours,
        prior=regularizer.prior,
        artifact=regularizer.source,
        mode=regularizer.mode,
        strength=float(regularizer.strength),
        adapter=regularizer.adapter,
        modules=regularizer.num_modules,
    )


def adapter_folder(folder: str | Path, adapter: str = "default") -> Path:
    """Where PEFT's ``save_pretrained(folder)`` puts an adapter: ``folder``, or ``folder/<name>`` for others."""
    return Path(folder) if adapter == "default" else Path(folder) / adapter


def write_provenance(folder: str | Path, regularizer: LaplaceRegularizer) -> Provenance:
    """Record the prior beside a saved adapter: the JSON file, and the model card's metadata and text.

    Call it after ``model.save_pretrained(folder)`` (PEFT writes ``README.md`` there; its content is
    kept, and a second call replaces the record instead of adding another). The Trainer mixins and
    :func:`~laplace_hub.consumers.save_adapter` call it for you.

    Args:
        folder: The folder given to ``save_pretrained``.
        regularizer: The regularizer the adapter was trained with.

    Returns:
        The record written.

    Raises:
        ProvenanceError: the JSON file cannot be written. A model card that cannot be updated is
            only a warning: the JSON file is the record.

    """
    record = provenance(regularizer)
    target = adapter_folder(folder, regularizer.adapter)
    try:
        target.mkdir(parents=True, exist_ok=True)
        _write_atomic(target / PROVENANCE_FILE, json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
    except OSError as e:
        raise ProvenanceError(f"cannot write {PROVENANCE_FILE}: {e.strerror or e}", location=str(target)) from e
    try:
        update_model_card(Path(folder) / CARD_FILE, record)
    except (OSError, LaplaceHubError, ImportError) as e:
        logger.warning("the adapter's %s does not record its prior (%s); %s does", CARD_FILE, e, PROVENANCE_FILE)
    return record


def _write_atomic(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def update_model_card(card: Path, record: Provenance) -> None:
    """Put ``record`` in a model card: YAML metadata under ``laplace_hub:``, a tag, and a section.

    The rest of the card (PEFT's or the Trainer's) is kept; a card holding an earlier record gets
    this one instead. A missing card is created.
    """
    import yaml

    text = ""
    if regular_size(card) is not None:
        with open_regular(card) as f:
            raw = f.read(MAX_CARD_BYTES + 1)
        if len(raw) > MAX_CARD_BYTES:
            raise ProvenanceError(f"larger than {MAX_CARD_BYTES} bytes; left alone", location=card.name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProvenanceError("not UTF-8 text; left alone", location=card.name) from e
    metadata: dict[str, Any] = {}
    body = text
    if text.startswith("---\n"):
        end = text.find("\n---\n", 3)
        if end != -1:
            try:
                loaded = yaml.safe_load(text[4:end])
            except yaml.YAMLError as e:
                raise ProvenanceError(f"its YAML metadata cannot be read: {e}", location=card.name) from e
            metadata = loaded if isinstance(loaded, dict) else {}
            body = text[end + 5 :]
    metadata["laplace_hub"] = record.model_dump(mode="json")
    tags = metadata.get("tags")
    tags = list(tags) if isinstance(tags, list) else [] if tags is None else [tags]
    metadata["tags"] = tags if "laplace-hub" in tags else [*tags, "laplace-hub"]
    section = f"{_BEGIN}\n{card_section(record)}{_END}\n"
    start, stop = body.find(_BEGIN), body.rfind(_END)  # the last end marker: a record may quote one
    if start != -1 and stop > start:
        body = body[:start] + section + body[stop + len(_END) :].lstrip("\n")
    else:
        body = body.rstrip("\n") + ("\n\n" if body.strip() else "\n") + section
    _write_atomic(card, f"---\n{front_matter(metadata)}---\n{body}")


def card_section(record: Provenance) -> str:
    """The model card's words for a record (Markdown; each string a code span, escaped when not printable)."""
    penalty = (
        f"λ = {record.strength:g}, mode `{record.mode}`, over {record.modules} LoRA module(s) of adapter "
        f"{markdown_code(record.adapter)}"
    )
    if record.artifact is None:
        prior = "an isotropic L2 prior (P = I)" if record.prior == "identity" else "a precision given in code"
        return f"## Laplace prior\n\nTrained with a LaLoRA penalty under {prior}: {penalty}.\n"
    a = record.artifact
    if a.repo_id:
        where = markdown_code(a.repo_id) + (f" at revision {markdown_code(a.revision)}" if a.revision else "")
    else:
        where = "held in memory" if a.path is None else markdown_code(a.path)
    if a.subfolder:
        where += f" (subfolder {markdown_code(a.subfolder)})"
    sha = f", manifest sha256 `{a.manifest_sha256}`" if a.manifest_sha256 else ""
    return (
        "## Laplace prior\n\n"
        f"Trained with a LaLoRA penalty (laplace-hub {record.laplace_hub_version}): {penalty}, "
        f"under the curvature artifact {where}{sha} (spec {a.spec_version}, {', '.join(a.structures)}, "
        f"{a.parameterization}-parameterised, {a.normalization} normalisation, "
        f"base model {markdown_code(a.base_model)}). "
        f"The same record is in `{PROVENANCE_FILE}` and in this card's metadata under `laplace_hub`.\n"
    )


def read_provenance(folder: str | Path) -> Provenance | None:
    """The record beside an adapter, or ``None`` when there is none.

    The folder is not trusted: the file must be a regular file of at most 64 KiB, strict JSON,
    and match :class:`Provenance`; unknown keys are ignored (a later minor's).

    Raises:
        ProvenanceError: the file is there but unreadable, malformed, or of a newer provenance_version.

    """
    path = Path(folder) / PROVENANCE_FILE
    try:
        if regular_size(path) is None:
            return None
        raw = read_json_bounded(path, MAX_PROVENANCE_BYTES, code="provenance.invalid")
    except LaplaceHubError as e:
        raise ProvenanceError(e.message, location=str(path)) from e
    if not isinstance(raw, dict):
        raise ProvenanceError("not a JSON object", location=str(path))
    version = raw.get("provenance_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > PROVENANCE_VERSION:
        raise ProvenanceError(
            f"provenance_version {version} is newer than this laplace-hub reads ({PROVENANCE_VERSION}); upgrade it",
            location=str(path),
        )
    try:
        return Provenance.model_validate(raw)
    except ValidationError as e:
        where, message = first_problem(e)
        raise ProvenanceError(f"{where or 'record'}: {message}", location=str(path)) from e
