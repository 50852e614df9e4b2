"""A small Hub-compatible server for tests: exactly the endpoints huggingface_hub's client uses.

Model repos only, in memory: create, info (by revision), tree, preupload, commit (with
``parentCommit`` and ``create_pr``), the LFS batch API and its upload URL, validate-yaml, refs,
list with tag filters, and ``resolve`` with the headers the client reads (X-Repo-Commit, ETag,
X-Linked-Etag, X-Linked-Size). Large files take the LFS path (``HF_HUB_DISABLE_XET=1``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml

REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class FileEntry:
    oid: str  # git blob sha1
    size: int
    sha256: str
    lfs: bool


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, FileEntry]
    message: str
    date: float


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0
    created: float = field(default_factory=time.time)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    """Repos, commits and blobs, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 → content
        self.commit_posts = 0
        # How the server lies (tests of a hostile endpoint): "sha" (model info's commit), and for file
        # downloads "etag", "commit" (X-Repo-Commit), "content_length", "truncate", "drip" (seconds per
        # byte, 40 bytes), "redirect_loop".
        self.lies: dict[str, Any] = {}
        self.served: list[tuple[str, int]] = []  # (path, bytes sent) of each file download, ranges included

    def create(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        initial = self._commit(repo, None, {}, "initial commit")
        repo.refs["main"] = initial.sha
        self.repos[repo_id] = repo
        return repo

    def _commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], message: str) -> Commit:
        payload = json.dumps(
            [repo.repo_id, parent, sorted((p, f.oid) for p, f in files.items()), message, time.time_ns()]
        ).encode()
        commit = Commit(hashlib.sha1(payload).hexdigest(), parent, files, message, time.time())
        repo.commits[commit.sha] = commit
        return commit

    def resolve(self, repo: Repo, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in repo.commits:
            return repo.commits[revision]
        sha = repo.refs.get(revision)
        return repo.commits[sha] if sha else None

    def add_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def tamper(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Flip a byte of a stored file without changing its recorded ids (a corrupt mirror)."""
        with self.lock:
            entry = self.resolve(self.repos[repo_id], revision).files[path]  # type: ignore[union-attr]
            data = bytearray(self.blobs[entry.sha256])
            data[-1] ^= 0xFF
            self.blobs[entry.sha256] = bytes(data)

    def card_data(self, commit: Commit) -> dict[str, Any]:
        entry = commit.files.get("README.md")
        if entry is None:
            return {}
        text = self.blobs[entry.sha256].decode()
        match = re.match(r"^---\n(.*?)\n---", text, re.S)
        return (yaml.safe_load(match[1]) or {}) if match else {}

    def info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        card = self.card_data(commit)
        bases = card.get("base_model") or []
        tags = list(card.get("tags") or []) + [
            f"base_model:{b}" for b in ([bases] if isinstance(bases, str) else bases)
        ]
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": self.lies.get("sha", commit.sha),
            "private": repo.private,
            "author": repo.repo_id.split("/")[0],
            "tags": tags,
            "cardData": card,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "library_name": card.get("library_name"),
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the state; errors carry X-Error-Code as the Hub's do."""

    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    # --- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json({"error": message}, status, {"X-Error-Code": code} if code else None)

    def _endpoint(self) -> str:
        return f"http://{self.headers['Host']}"

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit | None:
        commit = self.state.resolve(repo, revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def _route(self, routes: list[tuple[str, Any]]) -> None:
        url = urlparse(self.path)
        self.query = parse_qs(url.query)
        for pattern, handler in routes:
            match = re.fullmatch(pattern, url.path)
            if match:
                with self.state.lock:
                    handler(**match.groupdict())
                return
        self._error(404, f"no route for {self.command} {url.path}")

    def do_GET(self) -> None:
        self._route(
            [
                (r"/api/models", self.list_models),
                (rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self.model_info),
                (rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self.tree),
                (rf"/api/models/{REPO}/refs", self.refs),
                (rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
            ]
        )

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._route(
            [
                (r"/api/repos/create", self.create_repo),
                (r"/api/validate-yaml", self.validate_yaml),
                (rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
                (rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
                (rf"/{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            ]
        )

    def do_PUT(self) -> None:
        self._route([(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload)])

    # --- endpoints ------------------------------------------------------------------------------
    def create_repo(self) -> None:
        body = json.loads(self._body())
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo_id in self.state.repos:
            self._json({"error": "You already created this model repo", "url": f"{self._endpoint()}/{repo_id}"}, 409)
            return
        self.state.create(repo_id, bool(body.get("private")))
        self._json({"url": f"{self._endpoint()}/{repo_id}", "name": repo_id})

    def validate_yaml(self) -> None:
        content = json.loads(self._body()).get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            yaml.safe_load(match[1]) if match else None
        except yaml.YAMLError as e:
            self._json({"error": f"Invalid metadata in README.md: {e}"}, 400)
            return
        self._json({"errors": [], "warnings": []})

    def model_info(self, repo: str, rev: str | None = None) -> None:
        r = self._repo(repo)
        commit = r and self._commit_at(r, rev or "main")
        if r and commit:
            self._json(self.state.info(r, commit))

    def list_models(self) -> None:
        wanted = set(self.query.get("filter", []))
        found = []
        for repo in self.state.repos.values():
            info = self.state.info(repo, repo.commits[repo.refs["main"]])
            if wanted <= set(info["tags"]) | ({info["library_name"]} if info["library_name"] else set()):
                found.append(info)
        self._json(found)

    def refs(self, repo: str) -> None:
        r = self._repo(repo)
        if r:
            self._json(
                {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                        for n, s in r.refs.items()
                        if not n.startswith("refs/")
                    ],
                    "converts": [],
                    "tags": [],
                    "pullRequests": [
                        {"name": n, "ref": n, "targetCommit": s} for n, s in r.refs.items() if n.startswith("refs/pr/")
                    ],
                }
            )

    def tree(self, repo: str, rev: str, path: str | None = None) -> None:
        r = self._repo(repo)
        commit = r and self._commit_at(r, rev)
        if not (r and commit):
            return
        prefix = f"{unquote(path).rstrip('/')}/" if path else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for i in range(rest.count("/")):
                folders.add(prefix + "/".join(rest.split("/")[: i + 1]))
            item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": file_path}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            entries.append(item)
        if prefix and not entries and not folders:
            self._error(404, f"{path} does not exist", "EntryNotFound")
            return
        self._json([{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)] + entries)

    def resolve(self, repo: str, rev: str, path: str) -> None:
        r = self._repo(repo)
        commit = r and self._commit_at(r, rev)
        if not (r and commit):
            return
        entry = commit.files.get(unquote(path))
        if entry is None:
            self._error(404, f"Entry not found: {path}", "EntryNotFound")
            return
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.sha256 if entry.lfs else entry.oid}"'}
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        body = self.state.blobs[entry.sha256]
        if self.state.lies:
            self._lie(body, headers)
            return
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted is None:
            self.state.served.append((unquote(path), len(body)))
            self._send(200, body, headers, "application/octet-stream")
            return
        start, end = int(wanted[1]), min(int(wanted[2] or len(body) - 1), len(body) - 1)
        part = body[start : end + 1]
        self.state.served.append((unquote(path), len(part)))
        headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(body)}"
        self._send(206, part, headers, "application/octet-stream")

    def _lie(self, body: bytes, headers: dict[str, str]) -> None:
        lies = self.state.lies
        if lies.get("redirect_loop"):
            self._send(302, headers={"Location": self.path})
            return
        headers["ETag"] = lies.get("etag", headers["ETag"])
        headers["X-Repo-Commit"] = lies.get("commit", headers["X-Repo-Commit"])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(lies.get("content_length", len(body))))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if lies.get("truncate"):
            body = body[: len(body) // 2]
        try:
            if "drip" in lies:  # a byte at a time, for 40 bytes (the state lock is held meanwhile)
                for i in range(min(40, len(body))):
                    time.sleep(lies["drip"])
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
            else:
                self.wfile.write(body)
        except OSError:
            pass  # the client gave up
        self.close_connection = True

    def preupload(self, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if not r:
            return
        files = json.loads(self._body())["files"]
        commit = self.state.resolve(r, rev)
        out = []
        for f in files:
            existing = commit.files.get(f["path"]) if commit else None
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing else None,
                }
            )
        self._json({"files": out})

    def lfs_batch(self, repo: str) -> None:
        if not self._repo(repo):
            return
        objects = []
        for obj in json.loads(self._body())["objects"]:
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.blobs:
                item["actions"] = {"upload": {"href": f"{self._endpoint()}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "uploaded content does not match its oid")
            return
        self.state.add_blob(data)
        self._json({})

    def commit(self, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if not r:
            return
        self.state.commit_posts += 1
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        base = self.state.resolve(r, rev)
        if base is None:
            self._error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
            return
        parent = header.get("parentCommit")
        if parent and not create_pr and parent != base.sha:
            self._error(412, "A commit has happened since. Please refresh and try again.")
            return
        files = dict(base.files if not (create_pr and parent) else r.commits[parent].files)
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = FileEntry(git_blob_oid(data), len(data), self.state.add_blob(data), False)
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.state.blobs:
                    self._error(422, f"LFS object {value['oid']} was never uploaded")
                    return
                data = self.state.blobs[value["oid"]]
                files[value["path"]] = FileEntry(git_blob_oid(data), len(data), value["oid"], True)
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        commit = self.state._commit(r, base.sha, files, header.get("summary", ""))
        pr_url = None
        if create_pr:
            r.prs += 1
            r.refs[f"refs/pr/{r.prs}"] = commit.sha
            pr_url = f"{self._endpoint()}/{r.repo_id}/discussions/{r.prs}"
        else:
            r.refs[unquote(rev)] = commit.sha
        self._json(
            {
                "commitUrl": f"{self._endpoint()}/{r.repo_id}/commit/{commit.sha}",
                "commitOid": commit.sha,
                "pullRequestUrl": pr_url,
            }
        )


class HubServer:
    """Runs the handler on 127.0.0.1 in a background thread; ``url`` is its endpoint."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
