"""Hostile adapter folders: ``read_provenance`` and ``inspect`` end in a ProvenanceError or a record, never a crash."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laplace_hub.cli import main
from laplace_hub.consumers.provenance import ADAPTER_CONFIG, PROVENANCE_FILE, read_provenance
from laplace_hub.errors import ProvenanceError

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
)
KEYS = ["provenance_version", "artifact", "penalty", "manifest_sha256", "strength", "mode", "repo_id", "path"]
RECORDS = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6).map(lambda d: {"provenance_version": 1, **d})
DEEP = st.integers(min_value=30, max_value=3000).map(lambda n: "[" * n + "]" * n)
PAYLOADS = st.one_of(
    st.binary(max_size=200),
    RECORDS.map(lambda d: json.dumps(d).encode()),
    DEEP.map(str.encode),
    st.integers(min_value=60_000, max_value=200_000).map(lambda n: b'{"a": "' + b"x" * n + b'"}'),
)


def _folder(root: Path, payload: bytes, kind: str) -> Path:
    (root / ADAPTER_CONFIG).write_text("{}")
    target = root / PROVENANCE_FILE
    if kind == "file":
        target.write_bytes(payload)
    elif kind == "link":
        (root / "elsewhere.json").write_bytes(payload)
        target.symlink_to(root / "elsewhere.json")
    elif kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "sparse":
        with open(target, "wb") as f:
            f.truncate(2**40)
    return root


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=PAYLOADS, kind=st.sampled_from(["file", "file", "file", "link", "folder", "fifo", "sparse"]))
def test_hostile_provenance_is_a_clear_error(payload: bytes, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = _folder(Path(tmp), payload, kind)
        try:
            read_provenance(folder)
        except ProvenanceError as e:
            assert "\n" not in str(e)
        assert main(["inspect", str(folder), "--json"]) in (0, 1)
