"""``validate REPO --remote``: an artifact on a hub checked from its manifest, index and headers alone.

Against the test Hub server on 127.0.0.1 (real ``huggingface_hub`` client): what the remote check
reports must be what the validator reports on the same files without values, for every invalid
conformance vector; and no tensor file may be downloaded beyond its header.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from laplace_hub.errors import LaplaceHubError
from laplace_hub.hub import validate_remote
from laplace_hub.hub.download import HEADER_GUESS, Deadline, fetch_header
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE, save_tiny_artifact
from tests.hub_server import HubServer

TOKEN = "hf_secret_never_printed"
SHARDED = CONFORMANCE / "valid" / "weight-kron-sharded"
NOT_SEEN_REMOTELY = {"file.stray"}  # a file the manifest does not list is never fetched, so never pulled either

pytestmark = pytest.mark.hub


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer() as hub:
        yield hub


def commit(server: HubServer, files: dict[str, bytes], repo: str = "me/curv") -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo(repo, exist_ok=True)
    return api.create_commit(repo, [CommitOperationAdd(p, d) for p, d in files.items()], commit_message="raw").oid


def regular_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def test_a_valid_artifact_is_checked_from_its_headers_alone(server: HubServer, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=23, hidden_size=256, intermediate_size=32, num_hidden_layers=1)
    folder = save_tiny_artifact(LlamaForCausalLM(config).double(), tmp_path / "artifact")
    files = regular_files(folder)
    sha = commit(server, {"model.safetensors": b"\0" * 4096, **{f"laplace/{n}": d for n, d in files.items()}})
    report = validate_remote("me/curv", subfolder="laplace", hub=server.url, token=TOKEN)
    assert report.valid, report.findings
    assert report.revision == sha and report.files == 1 and report.checksums_confirmed == 1
    tensors = files["laplace.safetensors"]
    assert server.state.served == [
        ("laplace/laplace.json", len(files["laplace.json"])),
        ("laplace/laplace.safetensors", HEADER_GUESS),  # one range: the header and no more than the guess
    ]
    assert len(tensors) > 8 * HEADER_GUESS
    assert report.bytes_read == len(files["laplace.json"]) + 8 + int.from_bytes(tensors[:8], "little")
    assert validate_remote("me/curv", subfolder="laplace", hub=server.url, token=TOKEN, max_bytes=1000).errors[
        0
    ].code == ("file.budget")


def test_a_header_longer_than_the_first_range_is_read_in_two(server: HubServer) -> None:
    from safetensors.torch import save

    data = save({"x": torch.zeros(3)}, metadata={"pad": "p" * (HEADER_GUESS + 5000)})
    sha = commit(server, {"big.safetensors": data})
    url = f"{server.url}/me/curv/resolve/{sha}/big.safetensors"
    deadline = Deadline("me/curv@main")
    head = fetch_header(url, size=len(data), commit=sha, headers={}, deadline=deadline, name="big.safetensors")
    assert head == data[: 8 + int.from_bytes(data[:8], "little")]
    assert [n for _, n in server.state.served] == [HEADER_GUESS, len(head) - HEADER_GUESS]


def test_a_sharded_artifact_is_confirmed_file_by_file(server: HubServer) -> None:
    commit(server, regular_files(SHARDED))
    report = validate_remote("me/curv", hub=server.url, token=TOKEN)
    assert report.valid and report.files == 3 and report.checksums_confirmed == 3  # the index hashed, shards by LFS id


def test_a_corrupt_shard_is_named_by_the_hubs_sha256(server: HubServer) -> None:
    files = regular_files(SHARDED)
    shard = "laplace-00002-of-00002.safetensors"
    files[shard] = files[shard][:-1] + bytes([files[shard][-1] ^ 0xFF])  # same size and header, other sha256
    commit(server, files)
    report = validate_remote("me/curv", hub=server.url, token=TOKEN)
    assert [(f.code, f.location) for f in report.errors] == [("file.checksum", shard)]


@pytest.mark.parametrize("vector", sorted(p.name for p in (CONFORMANCE / "invalid").iterdir() if p.is_dir()), ids=str)
def test_the_remote_check_reports_what_the_validator_reports_without_values(server: HubServer, vector: str) -> None:
    folder = CONFORMANCE / "invalid" / vector
    local = {f.code for f in validate(folder, checksums=False, values=False).errors} - NOT_SEEN_REMOTELY
    files = regular_files(folder)
    if not files:
        pytest.skip("nothing to upload")
    commit(server, files)
    try:
        remote = {f.code for f in validate_remote("me/curv", hub=server.url, token=TOKEN).errors}
    except LaplaceHubError as e:  # refused before the headers: a missing manifest, a size the hub lists otherwise
        assert e.code in local | {"file.size"}, e
        return
    if local:
        assert remote == local
    else:  # only the values or the sha256 are wrong: the sha256 the hub lists catches the latter
        expected = validate(folder, values=False).errors
        assert remote == {f.code for f in expected} - NOT_SEEN_REMOTELY


def test_the_cli_prints_the_report_and_what_it_could_not_see(server: HubServer, tmp_path: Path) -> None:
    commit(server, regular_files(SHARDED))
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path), "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "laplace_hub.cli", "validate", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)

    text = run("me/curv@main", "--remote")
    assert text.returncode == 0, text.stderr
    assert "me/curv@main: valid" in text.stdout and "3 of 3 file checksums confirmed by the hub" in text.stdout
    data = json.loads(run("me/curv", "--remote", "--json").stdout)
    assert data["valid"] and data["values_checked"] is False and data["checksums_confirmed"] == 3
    missing = run("me/nothing", "--remote")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "me/nothing not found" in missing.stderr
    bad = run("me/curv", "--remote", "--no-values")
    assert bad.returncode == 1 and "drop --model, --no-checksums, --no-values" in bad.stderr
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing entered the cache


def test_a_local_hub_is_validated_in_place_with_values(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(CONFORMANCE / "invalid" / "nan", tmp_path / "hub" / "me" / "curv")
    report = validate_remote("me/curv", hub=tmp_path / "hub")
    assert [f.code for f in report.errors] == ["value.non_finite"]


def test_a_subfolder_that_leaves_the_repo_is_refused_before_any_request(server: HubServer) -> None:
    from laplace_hub.errors import HubError

    commit(server, regular_files(SHARDED))
    with pytest.raises(HubError, match=r"invalid subfolder '\.\./other'"):
        validate_remote("me/curv", subfolder="../other", hub=server.url, token=TOKEN)
    assert server.state.served == []
