"""A local stand-in for the Hugging Face Hub HTTP API, for tests that must not touch the network.

It implements just what ``huggingface_hub`` 2.4 (``HfApi`` + ``hf_hub_download`` / ``snapshot_download``, hence
``transformers.from_pretrained``) calls to create a repo, commit to it, branch it, open a PR and download from it:

    GET  /api/whoami-v2                                  who the token belongs to
    POST /api/validate-yaml                              README metadata check (always valid here)
    POST /api/repos/create                               new repo with an initial ``.gitattributes`` commit
    POST /api/models/{repo}/preupload/{rev}              upload mode per file: always "regular", so file contents
                                                         travel base64-inline in the commit (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]   NDJSON commit: header, file, deletedFile, deletedFolder
    POST /api/models/{repo}/branch/{branch}              new branch (409 if it exists)
    GET  /api/models/{repo}[/revision/{rev}]             model info with ``sha`` and ``siblings``
    GET  /api/models/{repo}/tree/{rev}[/{path}]          file listing (``recursive`` honoured, one page)
    GET  /api/models/{repo}/refs                         branches (and PRs with ``include_prs``)
    HEAD/GET /{repo}/resolve/{rev}/{path}                file metadata headers / content

Every commit stores a full snapshot of the repo and a ref moves only once the snapshot is complete, so a commit
is atomic by construction. ``HubStandIn.fail_commits = True`` makes the commit endpoint answer HTTP 500 after it
has read the whole payload, i.e. a commit that fails midway. Only the standard library is used.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, bytes]  # the full snapshot of the repo at this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)  # in creation order
    refs: dict[str, str] = field(default_factory=dict)  # "main", branches, "refs/pr/N" -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a PR ref or a commit oid (full or abbreviated) -> its commit."""
        oid = self.refs.get(revision, revision)
        matches = [c for c in self.commits if c.oid == oid or (len(oid) >= 7 and c.oid.startswith(oid))]
        return matches[0] if len(matches) == 1 else None

    @property
    def branches(self) -> dict[str, str]:
        return {name: oid for name, oid in self.refs.items() if not name.startswith("refs/pr/")}


class HubError(Exception):
    """An error answer, with the X-Error-Code header that makes huggingface_hub raise the right exception."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubStandIn:
    """In-memory Hub served on 127.0.0.1 at a free port. Use as a context manager, or start() / stop()."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.fail_commits = False  # answer HTTP 500 on every commit, storing nothing
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._lock = threading.RLock()
        self._oids = itertools.count()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> HubStandIn:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "call start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- helpers for tests -------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{revision!r} is not a revision of {repo_id}"
        return dict(commit.files)

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits) if repo_id in self.repos else 0

    # -- state changes (called with the lock held) -------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict[str, bytes]) -> Commit:
        seed = f"{repo.repo_id}:{next(self._oids)}:{parent.oid if parent else ''}:{title}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.oid if parent else None, title, files)
        repo.commits.append(commit)
        return commit

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    hub: HubStandIn

    # Route table: (method, pattern on the still-quoted path, handler). Groups are unquoted before the call, so a
    # revision such as "refs%2Fpr%2F1" arrives as "refs/pr/1" and never splits the path.
    ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        (m, re.compile(p), h)
        for m, p, h in [
            ("GET", r"/api/whoami-v2", "whoami"),
            ("POST", r"/api/validate-yaml", "validate_yaml"),
            ("POST", r"/api/repos/create", "create_repo"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", "create_branch"),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", "refs"),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "model_info"),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ]
    ]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        hub = self.hub
        with hub._lock:
            hub.requests.append((method, url.path))
            try:
                for route_method, pattern, name in self.ROUTES:
                    match = pattern.fullmatch(url.path)
                    if route_method == method and match:
                        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        handler: Callable[..., None] = getattr(self, f"_{name}")
                        handler(**args)
                        return
                raise HubError(404, f"the stand-in does not implement {method} {url.path}")
            except HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, {"error": err.message, **err.extra}, headers)

    def _send(
        self, status: int, payload: Any = None, headers: dict[str, str] | None = None, *, raw: bytes | None = None
    ) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    @property
    def authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def _require_auth(self) -> None:
        if not self.authorized:
            raise HubError(401, "Invalid username or password.")

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    # -- endpoints ---------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        self._require_auth()
        self._send(200, {"type": "user", "name": USER, "fullname": "Stand-in User", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _validate_yaml(self) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        self._require_auth()
        payload = self._json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "the stand-in only hosts model repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", url=url)  # exist_ok reads the url
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        self.hub.repos[repo_id] = repo
        repo.refs["main"] = self.hub._new_commit(repo, None, "initial commit", {".gitattributes": GITATTRIBUTES}).oid
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, repo: str, rev: str) -> None:
        self._require_auth()
        commit = self.hub._commit_at(self.hub._repo(repo, True), rev)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # contents go inline in the commit: no LFS / Xet transfer to fake
                "shouldIgnore": False,
                "oid": git_blob_sha(commit.files[f["path"]]) if f["path"] in commit.files else None,
            }
            for f in self._json()["files"]
        ]
        self._send(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, repo: str, rev: str) -> None:
        self._require_auth()
        hub, repo_ = self.hub, self.hub._repo(repo, True)
        if rev not in repo_.branches:
            raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
        parent = hub._commit_at(repo_, rev)
        files, header = dict(parent.files), {}
        for line in self.body.splitlines():  # NDJSON: one operation per line, applied to a copy
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile: cannot happen, preupload never answers "lfs"
                raise HubError(400, f"the stand-in does not accept {key!r} operations")
        if hub.fail_commits:  # the payload was received in full: fail midway, before anything is recorded
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = hub._new_commit(repo_, parent, header.get("summary", ""), files)
        pr_url = None
        if self.query.get("create_pr") == "1":
            number = 1 + sum(name.startswith("refs/pr/") for name in repo_.refs)
            repo_.refs[f"refs/pr/{number}"] = commit.oid
            pr_url = f"{hub.url}/{repo}/discussions/{number}"
        else:
            repo_.refs[rev] = commit.oid
        commit_url = f"{hub.url}/{repo}/commit/{commit.oid}"
        self._send(200, {"success": True, "commitOid": commit.oid, "commitUrl": commit_url, "pullRequestUrl": pr_url})

    def _create_branch(self, repo: str, branch: str) -> None:
        self._require_auth()
        repo_ = self.hub._repo(repo, True)
        if branch in repo_.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.hub._commit_at(repo_, self._json().get("startingPoint") or "main")
        repo_.refs[branch] = start.oid
        self._send(200, {})

    def _refs(self, repo: str) -> None:
        repo_ = self.hub._repo(repo, self.authorized)

        def ref(name: str, oid: str, prefix: str) -> dict:
            return {"name": name, "ref": f"{prefix}{name}", "targetCommit": oid}

        branches = [ref(n, o, "refs/heads/") for n, o in repo_.branches.items()]
        payload = {"branches": branches, "tags": [], "converts": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = [ref(n, o, "") for n, o in repo_.refs.items() if n.startswith("refs/pr/")]
        self._send(200, payload)

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        commit = self.hub._commit_at(self.hub._repo(repo, self.authorized), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for file_path, content in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "size": len(content),
                                      "oid": git_blob_sha(content)}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._send(200, list(entries.values()))

    def _model_info(self, repo: str, rev: str = "main") -> None:
        repo_ = self.hub._repo(repo, self.authorized)
        commit = self.hub._commit_at(repo_, rev)
        self._send(200, {
            "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid, "private": repo_.private,
            "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        commit = self.hub._commit_at(self.hub._repo(repo, self.authorized), rev)
        if path not in commit.files:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
            self._send(404, {"error": "Entry not found"}, {**headers, "X-Repo-Commit": commit.oid})
            return
        content = commit.files[path]
        # X-Repo-Commit and ETag are what hf_hub_download needs to place the file in its cache.
        self._send(200, headers={"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha(content)}"'}, raw=content)
