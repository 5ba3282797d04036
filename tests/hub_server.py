"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for offline tests.

`HubServer` runs a stdlib `http.server` in a daemon thread bound to 127.0.0.1 on a free port and speaks
just the routes that these client code paths use (traced with huggingface_hub 2.4 / datasets 5.2):

* `datasets.Dataset.push_to_hub` and `HfApi.create_repo` / `create_branch` / `upload_file` /
  `create_commit` / `DatasetCard.push_to_hub`;
* `datasets.load_dataset(repo_id)`, `hf_hub_download` and `HfFileSystem` reads.

Routes (`{type}` is `models`, `datasets` or `spaces`; `{prefix}` is empty, `datasets/` or `spaces/`;
a revision is a branch, `refs/pr/N` or a commit sha, URL-quoted as the clients send it)::

    GET  /api/whoami-v2
    POST /api/repos/create
    POST /api/validate-yaml
    GET  /api/{type}/{ns}/{name}[/revision/{rev}]          repo info (sha, siblings, cardData)
    GET  /api/{type}/{ns}/{name}/refs                      branches and pull requests
    POST /api/{type}/{ns}/{name}/branch/{branch}           create a branch (409 if it exists)
    POST /api/{type}/{ns}/{name}/preupload/{rev}           upload modes: "lfs" for binary/large files
    POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch   LFS batch API ("basic" transfer)
    PUT  /_lfs/{sha256}                                    LFS object upload (checked against its oid)
    POST /api/{type}/{ns}/{name}/commit/{rev}[?create_pr=1] ndjson commit; parentCommit -> 412 if stale
    GET  /api/{type}/{ns}/{name}/tree/{rev}[/{path}]       listing (recursive=, expand=)
    POST /api/{type}/{ns}/{name}/paths-info/{rev}          info for given paths
    GET  /api/{type}/{ns}/{name}/commits/{rev}             history of a revision
    GET|HEAD /{prefix}{ns}/{name}/resolve/{rev}/{path}     file bytes (Range supported); ETag,
                                                           X-Repo-Commit, X-Linked-Etag/-Size for LFS

Anything else is answered with a 404 whose message starts with ``hub_server: unknown route`` and is
recorded in `HubServer.unknown_routes`, so that a client change shows up as an obvious failure.

State is kept in memory: `HubServer.repos[(repo_type, repo_id)]` is a `Repo` whose commits map
sha -> {path: bytes}; `HubServer.files(repo_id, revision)` gives the file dict of a revision.
Every request is recorded in `HubServer.requests` (method, path, query, Authorization header) so
tests can check which token was sent where. If `HubServer(token=...)` is given, writes (and reads
of private repos) require ``Authorization: Bearer <token>`` (401 otherwise).

The HF libraries read `HF_ENDPOINT` when they are imported (`huggingface_hub.constants.ENDPOINT`,
`datasets.config.HF_ENDPOINT`), so the process that talks to this server must have the variables
of `hub_env()` set before importing them; the usual way is a subprocess (see `run_python`).

Example::

    with HubServer(token="hf_test") as hub:
        result = run_python("from datasets import load_dataset; ...", env=hub_env(hub.url, tmp_path))
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["HubServer", "RecordedRequest", "Repo", "hub_env", "run_python", "LOOPBACK_GUARD"]

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files sent through LFS even when small (as the default .gitattributes of a Hub repo does).
_LFS_SUFFIXES = (".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".bin", ".safetensors", ".npy", ".zip", ".gz")
_LFS_MIN_SIZE = 10 * 1024 * 1024
_DEFAULT_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES).encode()
_YAML_BLOCK = re.compile(r"\A\ufeff?---\s*\r?\n(.*?)\r?\n---\s*(\r?\n|\Z)", re.S)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server saw it (the body is kept for commit/preupload inspection)."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    status: int = 0
    body: bytes = b""


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, bytes]
    lfs_paths: frozenset[str]


@dataclasses.dataclass
class Repo:
    """A repository: its refs (branch or ``refs/pr/N`` -> sha) and every commit's full snapshot."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    num_prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        """A branch, ``refs/pr/N``, ``refs/heads/<branch>`` or (a prefix of) a commit sha -> commit."""
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision):
            matches = [c for sha, c in self.commits.items() if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


class HubServer:
    """In-process fake Hub. Use as a context manager, or call `start()` / `stop()`."""

    def __init__(self, token: str | None = None, username: str = "tester") -> None:
        self.token = token
        self.username = username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.unknown_routes: list[str] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection helpers for tests ----------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """Path -> content of every file at `revision` (LFS files are given by content, not pointer)."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(f"revision {revision!r} not found in {repo_type} repo {repo_id!r}")
        return dict(commit.files)

    def all_stored_bytes(self) -> list[tuple[str, bytes]]:
        """(label, bytes) of every file of every commit and every LFS object (for leak checks)."""
        out = [(f"lfs:{oid}", data) for oid, data in self.lfs_objects.items()]
        for (_, repo_id), repo in self.repos.items():
            for commit in repo.commits.values():
                out.extend((f"{repo_id}@{commit.sha[:8]}:{p}", d) for p, d in commit.files.items())
        return out

    # -- state changes (called with the lock held) ----------------------------------------------
    def _new_sha(self, seed: str) -> str:
        self._commit_counter += 1
        return hashlib.sha1(f"{self._commit_counter}:{seed}".encode()).hexdigest()

    def _commit(
        self,
        repo: Repo,
        parent: Commit | None,
        title: str,
        description: str,
        files: dict[str, bytes],
        lfs_paths: set[str],
    ) -> Commit:
        commit = Commit(
            sha=self._new_sha(f"{repo.repo_id}:{title}"),
            parent=parent.sha if parent else None,
            title=title,
            description=description,
            date=_now(),
            files=files,
            lfs_paths=frozenset(lfs_paths),
        )
        repo.commits[commit.sha] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        initial = self._commit(repo, None, "initial commit", "", {".gitattributes": _DEFAULT_GITATTRIBUTES}, set())
        repo.refs["main"] = initial.sha
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"


class _HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_FILE_ROUTE = re.compile(r"^/(datasets/|spaces/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(datasets/|spaces/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/_lfs/([0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the bound subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        return

    # -- plumbing ------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        self._record = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query),
            authorization=self.headers.get("Authorization"),
            body=body,
        )
        with self.hub._lock:
            self.hub.requests.append(self._record)
        try:
            with self.hub._lock:
                self._route(split.path, self._record.query, body)
        except _HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            self._json({"error": err.message}, status=err.status, headers=headers)
        except Exception as err:  # a server bug: make it loud on the client side
            self._json({"error": f"hub_server internal error: {err!r}"}, status=500)
            raise

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # -- auth ----------------------------------------------------------------------------------
    def _check_token(self, write: bool, repo: Repo | None = None) -> None:
        expected = self.hub.token
        if expected is None or not (write or (repo is not None and repo.private)):
            return
        if self.headers.get("Authorization") != f"Bearer {expected}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        self._check_token(write=False, repo=repo)
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routing -------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        method = self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if (m := _LFS_PUT.match(path)) and method == "PUT":
            return self._lfs_put(m.group(1), body)
        if (m := _LFS_BATCH.match(path)) and method == "POST":
            repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1) or "", "model")
            return self._lfs_batch(repo_type, f"{m.group(2)}/{m.group(3)}", json.loads(body or b"{}"))
        if (m := _FILE_ROUTE.match(path)) and method in ("GET", "HEAD"):
            repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1) or "", "model")
            return self._resolve(
                repo_type, f"{unquote(m.group(2))}/{unquote(m.group(3))}", unquote(m.group(4)), unquote(m.group(5))
            )
        if m := _API_REPO.match(path):
            repo_type = _REPO_TYPES[m.group(1)]
            repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
            rest = m.group(4) or ""
            action, _, tail = rest.partition("/")
            if method == "GET" and action == "":
                return self._repo_info(repo_type, repo_id, "main")
            if method == "GET" and action == "revision" and tail:
                return self._repo_info(repo_type, repo_id, unquote(tail))
            if method == "GET" and action == "refs":
                return self._refs(repo_type, repo_id, query)
            if method == "POST" and action == "branch" and tail:
                return self._create_branch(repo_type, repo_id, unquote(tail), json.loads(body or b"{}"))
            if method == "POST" and action == "preupload" and tail:
                return self._preupload(repo_type, repo_id, unquote(tail), json.loads(body or b"{}"))
            if method == "POST" and action == "commit" and tail:
                return self._commit(repo_type, repo_id, unquote(tail), query, body)
            if method == "GET" and action == "tree" and tail:
                revision, _, sub = tail.partition("/")
                return self._tree(repo_type, repo_id, unquote(revision), unquote(sub), query)
            if method == "POST" and action == "paths-info" and tail:
                return self._paths_info(repo_type, repo_id, unquote(tail), body)
            if method == "GET" and action == "commits" and tail:
                return self._commits(repo_type, repo_id, unquote(tail))
        if re.fullmatch(r"/api/(models|datasets|spaces)/[^/]+", path) and method == "GET":
            raise _HubError(404, f"Repository not found: {path}", "RepoNotFound")
        message = f"hub_server: unknown route {method} {self.path}"
        self.hub.unknown_routes.append(f"{method} {self.path}")
        raise _HubError(404, message)

    # -- handlers ------------------------------------------------------------------------------
    def _whoami(self) -> None:
        if self.hub.token is not None and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        self._json(
            {
                "type": "user",
                "name": self.hub.username,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            }
        )

    def _create_repo(self, payload: dict) -> None:
        self._check_token(write=True)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload['name']}"
        if (repo_type, repo_id) in self.hub.repos:
            raise _HubError(409, "You already created this repo", None)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.hub.create_repo(repo_type, repo_id, private=private)
        self._json({"url": self.hub.repo_url(repo), "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        match = _YAML_BLOCK.match(content)
        if match:
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                self._send(400, f"Invalid YAML in card metadata: {err}".encode(), content_type="text/plain")
                return
            if data is not None and not isinstance(data, dict):
                self._send(400, b"Card metadata must be a YAML mapping", content_type="text/plain")
                return
        self._json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        card_data = None
        readme = commit.files.get("README.md")
        if readme is not None and (match := _YAML_BLOCK.match(readme.decode("utf-8", "replace"))):
            try:
                card_data = yaml.safe_load(match.group(1))
            except yaml.YAMLError:
                card_data = None
        self._json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "cardData": card_data,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                "usedStorage": sum(len(d) for d in commit.files.values()),
            }
        )

    def _refs(self, repo_type: str, repo_id: str, query: dict[str, list[str]]) -> None:
        repo = self._get_repo(repo_type, repo_id)
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
            for n, s in repo.refs.items()
            if not n.startswith("refs/")
        ]
        prs = [{"name": n, "ref": n, "targetCommit": s} for n, s in repo.refs.items() if n.startswith("refs/pr/")]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs"):
            out["pullRequests"] = prs
        self._json(out)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._check_token(write=True)
        if branch in repo.refs:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._get_commit(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha
        self._json({})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._check_token(write=True)
        commit = repo.resolve(revision)
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].lower().endswith(_LFS_SUFFIXES) or f.get("size", 0) >= _LFS_MIN_SIZE or b"\0" in sample
            existing = commit.files.get(f["path"]) if commit else None
            oid = None
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if lfs else _git_blob_sha1(existing)
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": files, "commitOid": commit.sha if commit else None})

    def _lfs_batch(self, repo_type: str, repo_id: str, payload: dict) -> None:
        self._get_repo(repo_type, repo_id)
        self._check_token(write=True)
        objects = []
        for obj in payload.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"LFS upload: content does not match oid {oid}")
        self.hub.lfs_objects[oid] = body
        self._send(200, b"")

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._check_token(write=True)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        head = self._get_commit(repo, revision)
        parent_sha = header.get("parentCommit")
        if parent_sha is not None:
            parent = repo.resolve(parent_sha)
            if parent is None:
                raise _HubError(412, f"Parent commit {parent_sha} not found")
            if not create_pr and parent.sha != head.sha:
                raise _HubError(412, f"A commit has happened since. Parent {parent_sha} is not {head.sha}")
            base = parent
        else:
            base = head
        files = dict(base.files)
        lfs_paths = set(base.lfs_paths)
        for item in lines:
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                continue
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"hub_server: unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise _HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = data
                lfs_paths.add(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, f"File to delete not found: {value['path']}", "EntryNotFound")
                lfs_paths.discard(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    files.pop(p)
                    lfs_paths.discard(p)
            else:
                raise _HubError(400, f"hub_server: unsupported commit operation {key!r}")
        commit = self.hub._commit(
            repo, base, header.get("summary", ""), header.get("description", ""), files, lfs_paths
        )
        pr_url = None
        if create_pr:
            repo.num_prs += 1
            repo.refs[f"refs/pr/{repo.num_prs}"] = commit.sha
            pr_url = f"{self.hub.repo_url(repo)}/discussions/{repo.num_prs}"
        else:
            ref = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            if ref not in repo.refs:
                raise _HubError(400, f"Cannot commit to {revision!r}: not a branch or pull request ref")
            repo.refs[ref] = commit.sha
        self._json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.repo_url(repo)}/commit/{commit.sha}",
                "pullRequestUrl": pr_url,
            }
        )

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        if path in commit.files:
            data = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
            if path in commit.lfs_paths:
                pointer = _lfs_pointer(data)
                entry["oid"] = _git_blob_sha1(pointer)
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            else:
                entry["oid"] = _git_blob_sha1(data)
        else:
            entry = {
                "type": "directory",
                "path": path,
                "size": 0,
                "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(),
            }
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    @staticmethod
    def _dirs(files: dict[str, bytes]) -> set[str]:
        dirs = set()
        for p in files:
            parts = p.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs

    def _tree(self, repo_type: str, repo_id: str, revision: str, sub: str, query: dict[str, list[str]]) -> None:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["False"])[0].lower() in ("1", "true")
        sub = sub.strip("/")
        dirs = self._dirs(commit.files)
        if sub and sub not in dirs:
            raise _HubError(404, f"Entry not found: {sub}", "EntryNotFound")
        prefix = f"{sub}/" if sub else ""
        paths = [p for p in sorted(dirs) + sorted(commit.files) if p.startswith(prefix)]
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
        # directories first, like the Hub
        entries = [self._entry(repo, commit, p, expand) for p in paths]
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        self._json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
        dirs = self._dirs(commit.files)
        out = [
            self._entry(repo, commit, p.strip("/"), expand)
            for p in paths
            if p.strip("/") in commit.files or p.strip("/") in dirs
        ]
        self._json(out)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        commit: Commit | None = self._get_commit(repo, revision)
        out = []
        while commit is not None:
            out.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.description,
                    "date": commit.date,
                    "authors": [{"user": self.hub.username}],
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(out)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        if path not in commit.files:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if path in commit.lfs_paths:
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{_git_blob_sha1(data)}"'
        range_header = self.headers.get("Range")
        if range_header and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())):
            size = len(data)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(size - int(m.group(2)), 0), size - 1
            if start >= size:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"}, content_type="application/octet-stream")
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(206, data[start : end + 1], headers, content_type="application/octet-stream")
            return
        self._send(200, data, headers, content_type="application/octet-stream")


# -- running HF client code against the server ---------------------------------------------------

#: Python source that makes every non-loopback socket connection fail: prepend it to subprocess code
#: to prove a test never leaves 127.0.0.1.
LOOPBACK_GUARD = """
import socket as _socket
_orig_connect = _socket.socket.connect
def _loopback_only(self, address, *a, **k):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and self.family in (_socket.AF_INET, _socket.AF_INET6) \\
            and host not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"test guard: connection to {host!r} refused (only 127.0.0.1 is allowed)")
    return _orig_connect(self, address, *a, **k)
_socket.socket.connect = _loopback_only
"""


def hub_env(endpoint: str, home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that talks to the fake Hub at `endpoint`.

    Must be in place before `huggingface_hub` / `datasets` are imported (they read it at import).
    Caches go under `home`; no token is inherited (HF_TOKEN and the cached login are cleared), the
    process is online (HF_HUB_OFFLINE=0) but only towards `endpoint`.
    """
    env = dict(os.environ if base is None else base)
    for key in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HF_DATASETS_CACHE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_XET_CACHE",
        "HF_ASSETS_CACHE",
    ):
        env.pop(key, None)
    env.update(
        {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0",
            "HF_HOME": str(home / "hf_home"),
            "HF_TOKEN_PATH": str(home / "hf_home" / "no_token"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def run_python(
    code: str, env: dict[str, str], cwd: str | os.PathLike | None = None, timeout: float = 120
) -> dict[str, Any]:
    """Run `code` in a fresh interpreter under `env` (with `LOOPBACK_GUARD` first) and return its result.

    The code reports back by assigning a JSON-serialisable object to ``RESULT``. A non-zero exit
    raises `AssertionError` carrying the child's stderr.
    """
    wrapper = (
        LOOPBACK_GUARD
        + "\nimport json as _json, sys as _sys\nRESULT = None\n"
        + code
        + "\n_sys.stdout.write('\\n@@RESULT@@' + _json.dumps(RESULT))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    _, _, payload = proc.stdout.rpartition("@@RESULT@@")
    return {"result": json.loads(payload), "stderr": proc.stderr, "stdout": proc.stdout}
