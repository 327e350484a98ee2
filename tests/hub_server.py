"""A small, strict Hugging Face Hub-compatible HTTP server for tests (127.0.0.1, repos on disk).

It serves the routes the real ``huggingface_hub`` client uses to create repos, upload (preupload ->
LFS batch -> PUT -> commit) and download (repo info, tree, resolve); see
``shared/reference/hub-testing.md``. It is strict so that tests mean something: writes need a known
token, LFS uploads are checked against their sha256 and size, unknown routes and NDJSON keys are
rejected, a stale ``parentCommit`` gets 412. ``faults`` injects server errors: ``faults["commit"] = n``
answers the next n commits with HTTP 500 after the LFS uploads went through; ``faults["drop_commit"] = n``
closes the connection of the next n commits without a reply; ``faults["drop_lfs"] = n`` closes the
connection of the next n LFS uploads (PUT) without a reply.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".parquet", ".arrow", ".npy", ".png")
TYPES = {"models": "model", "datasets": "dataset"}
PREFIX = {"model": "", "dataset": "datasets/"}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    sha1: str
    sha256: str
    lfs: bool


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    owner: str
    commits: list[tuple[str, dict[str, Entry]]] = field(default_factory=list)  # (oid, files), oldest first

    def snapshot(self, rev: str) -> tuple[str, dict[str, Entry]] | None:
        if rev == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == rev), None)


class HubState:
    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = root
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.pending_lfs: dict[str, int] = {}  # oid -> size announced in a batch request
        self.faults: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.secret = b"hub-test-secret"

    def sign(self, oid: str) -> str:
        return hmac.new(self.secret, oid.encode(), "sha256").hexdigest()

    def fault(self, name: str) -> bool:
        with self.lock:
            if self.faults.get(name, 0) > 0:
                self.faults[name] -= 1
                return True
        return False


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra or {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set by serve()

    def log_message(self, *args):  # keep test output clean
        pass

    # ----- plumbing -----------------------------------------------------------------------------
    def _body(self) -> bytes:
        if getattr(self, "_read", None) is None:
            self._read = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._read

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self._body()  # drain the request body before replying (keep-alive)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and self.command != "HEAD":  # a HEAD reply never has a body (keep-alive would break)
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return self.state.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _writer(self, repo: Repo | None = None) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if repo is not None and repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo.repo_id}")
        return user

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._user() != repo.owner):
            raise HubError(401 if repo is not None or self._user() is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _dispatch(self, method: str):
        self._read = None
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.state.requests.append((method, path))
        try:
            for pattern, handler in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and handler.__name__.startswith(method.lower() + "_"):
                    return handler(self, query, **m.groupdict())
            raise HubError(404, f"unknown route {method} {path}")
        except HubError as exc:
            headers = {"X-Error-Code": exc.code} if exc.code else {}
            headers["X-Error-Message"] = str(exc)
            self._json(exc.status, {"error": str(exc), **exc.extra}, headers)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ----- routes -------------------------------------------------------------------------------
    def post_create(self, query):
        payload = json.loads(self._body())
        user = self._writer()
        unknown = set(payload) - {"name", "organization", "type", "visibility", "private"}
        if unknown:
            raise HubError(400, f"unknown keys {sorted(unknown)}")
        owner = payload.get("organization") or user
        if owner != user:
            raise HubError(403, f"no rights to create repos under {owner}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{owner}/{payload['name']}"
        url = f"{self.state.endpoint}/{PREFIX[repo_type]}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_type, repo_id, private, owner)
            oid = hashlib.sha1(f"{repo_id}-init-{time.time_ns()}".encode()).hexdigest()
            repo.commits.append((oid, {}))
            self.state.repos[(repo_type, repo_id)] = repo
        self._json(200, {"url": url, "name": repo_id})

    def post_validate_yaml(self, query):
        json.loads(self._body())
        self._json(200, {"errors": [], "warnings": []})

    def post_preupload(self, query, t, repo_id, rev):
        repo = self._repo(TYPES[t], repo_id)
        self._writer(repo)
        snap = repo.snapshot(rev)
        if snap is None:
            raise HubError(404, f"revision {rev} not found", "RevisionNotFound")
        out = []
        for f in json.loads(self._body())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000 or b"\0" in sample
            old = snap[1].get(f["path"])
            oid = None if old is None else (old.sha256 if old.lfs else old.sha1)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out})

    def post_lfs_batch(self, query, p, repo_id):
        repo = self._repo("dataset" if p else "model", repo_id)
        self._writer(repo)
        payload = json.loads(self._body())
        if payload.get("operation") != "upload":
            raise HubError(400, "only upload batches are supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                raise HubError(400, f"bad oid {oid}")
            entry = {"oid": oid, "size": size}
            if not (self.state.objects / oid).is_file():
                self.state.pending_lfs[oid] = size
                sig = self.state.sign(oid)
                entry["actions"] = {
                    "upload": {"href": f"{self.state.endpoint}/_lfs/{oid}?sig={sig}", "header": {}},
                    "verify": {"href": f"{self.state.endpoint}/_lfs_verify/{oid}?sig={sig}", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def put_lfs_object(self, query, oid):
        if not hmac.compare_digest(query.get("sig", [""])[0], self.state.sign(oid)):
            raise HubError(403, "bad upload signature")
        data = self._body()
        if self.state.fault("drop_lfs"):  # the connection dies before any reply (a dropped LFS upload)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        expected = self.state.pending_lfs.get(oid)
        if expected is None or len(data) != expected or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match the announced sha256/size")
        (self.state.objects / oid).write_bytes(data)
        self._send(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def post_lfs_verify(self, query, oid):
        payload = json.loads(self._body())
        path = self.state.objects / oid
        if not path.is_file() or path.stat().st_size != payload.get("size"):
            raise HubError(404, "object not uploaded")
        self._json(200, {})

    def post_commit(self, query, t, repo_id, rev):
        repo = self._repo(TYPES[t], repo_id)
        self._writer(repo)
        lines = [json.loads(x) for x in self._body().splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        if set(header) - {"summary", "description", "parentCommit"}:
            raise HubError(400, f"unknown header keys {sorted(set(header))}")
        if self.state.fault("commit"):
            raise HubError(500, "injected server error during commit")
        if self.state.fault("drop_commit"):  # the connection dies before any reply (a dropped upload)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        with self.state.lock:
            head, files = repo.snapshot(rev) or (None, None)
            if files is None:
                raise HubError(404, f"revision {rev} not found", "RevisionNotFound")
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, "parentCommit is not the head of the branch")
            files = dict(files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if set(value) - {"path", "content", "encoding"} or value.get("encoding") != "base64":
                        raise HubError(400, f"bad file line keys {sorted(value)}")
                    data = base64.b64decode(value["content"])
                    sha256 = hashlib.sha256(data).hexdigest()
                    (self.state.objects / sha256).write_bytes(data)
                    files[value["path"]] = Entry(len(data), git_sha1(data), sha256, False)
                elif key == "lfsFile":
                    if set(value) - {"path", "algo", "oid", "size"} or value.get("algo") != "sha256":
                        raise HubError(400, f"bad lfsFile line keys {sorted(value)}")
                    blob = self.state.objects / value["oid"]
                    if not blob.is_file() or blob.stat().st_size != value["size"]:
                        raise HubError(422, f"LFS object for {value['path']} was not uploaded")
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n"
                    files[value["path"]] = Entry(value["size"], git_sha1(pointer.encode()), value["oid"], True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {k: v for k, v in files.items() if not k.startswith(prefix)}
                else:
                    raise HubError(400, f"unknown NDJSON key {key!r}")
            oid = hashlib.sha1(json.dumps([head, header, sorted((k, v.sha256) for k, v in files.items())]).encode()).hexdigest()
            repo.commits.append((oid, files))
        self._json(200, {"commitUrl": f"{self.state.endpoint}/{PREFIX[repo.repo_type]}{repo_id}/commit/{oid}", "commitOid": oid})

    def get_info(self, query, t, repo_id, rev=None):
        repo = self._repo(TYPES[t], repo_id)
        snap = repo.snapshot(rev or "main")
        if snap is None:
            raise HubError(404, f"revision {rev} not found", "RevisionNotFound")
        siblings = [
            {"rfilename": p, "size": e.size, "blobId": e.sha1,
             **({"lfs": {"size": e.size, "sha256": e.sha256, "pointerSize": 134}} if e.lfs else {})}
            for p, e in sorted(snap[1].items())
        ]
        self._json(200, {"id": repo_id, "sha": snap[0], "private": repo.private, "siblings": siblings})

    def get_tree(self, query, t, repo_id, rev, path=None):
        repo = self._repo(TYPES[t], repo_id)
        snap = repo.snapshot(rev)
        if snap is None:
            raise HubError(404, f"revision {rev} not found", "RevisionNotFound")
        prefix = (path.strip("/") + "/") if path else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        out, folders = [], set()
        for p, e in sorted(snap[1].items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for i in range(1, rest.count("/") + 1):
                folders.add(prefix + "/".join(rest.split("/")[:i]))
            out.append({"type": "file", "path": p, "size": e.size, "oid": e.sha1,
                        **({"lfs": {"oid": e.sha256, "size": e.size, "pointerSize": 134}} if e.lfs else {})})
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        self._json(200, out)

    def get_resolve(self, query, p, repo_id, rev, path):
        self._resolve(p, repo_id, rev, path, head=False)

    def head_resolve(self, query, p, repo_id, rev, path):
        self._resolve(p, repo_id, rev, path, head=True)

    def _resolve(self, p, repo_id, rev, path, head):
        repo = self._repo("dataset" if p else "model", repo_id)
        snap = repo.snapshot(rev)
        if snap is None:
            raise HubError(404, f"revision {rev} not found", "RevisionNotFound")
        entry = snap[1].get(path)
        if entry is None:
            raise HubError(404, f"{path} not found", "EntryNotFound", )
        data = (self.state.objects / entry.sha256).read_bytes()
        etag = entry.sha256 if entry.lfs else entry.sha1
        headers = {"X-Repo-Commit": snap[0], "ETag": f'"{etag}"', "Content-Length": len(data),
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": entry.size})
        self._send(200, data, headers, head=head)


_REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+)"
ROUTES = [
    (r"/api/repos/create", Handler.post_create),
    (r"/api/validate-yaml", Handler.post_validate_yaml),
    (rf"/api/(?P<t>models|datasets)/{_REPO}/preupload/(?P<rev>[^/]+)", Handler.post_preupload),
    (rf"/(?P<p>datasets/)?{_REPO}\.git/info/lfs/objects/batch", Handler.post_lfs_batch),
    (r"/_lfs/(?P<oid>[0-9a-f]{64})", Handler.put_lfs_object),
    (r"/_lfs_verify/(?P<oid>[0-9a-f]{64})", Handler.post_lfs_verify),
    (rf"/api/(?P<t>models|datasets)/{_REPO}/commit/(?P<rev>[^/]+)", Handler.post_commit),
    (rf"/api/(?P<t>models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?", Handler.get_info),
    (rf"/api/(?P<t>models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", Handler.get_tree),
    (rf"/(?P<p>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.get_resolve),
    (rf"/(?P<p>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.head_resolve),
]


def serve(root: Path, tokens: dict[str, str]) -> tuple[ThreadingHTTPServer, HubState]:
    """Start the server on 127.0.0.1 (free port) in a daemon thread; returns (server, state)."""
    state = HubState(root, tokens)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def point_hub_at(monkeypatch, endpoint: str) -> None:
    """Point the real, unpatched huggingface_hub client (and transformers) at ``endpoint`` (the loopback Hub)."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
