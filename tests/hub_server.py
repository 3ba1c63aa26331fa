"""A small in-memory Hugging Face Hub HTTP server for tests (standard library only).

It speaks the part of the Hub HTTP API that ``huggingface_hub`` 2.4 and ``transformers`` 5.x use
(see ``/work/shared/docs/HUB_PROTOCOL.md``), so tests can run the *real* clients end to end on
127.0.0.1 with no network:

    from tests.hub_server import LocalHub, hub_env, run_client

    with LocalHub() as hub:
        env = hub_env(hub, tmp_path / "hf_home")
        run_client("from huggingface_hub import create_repo; create_repo('org/x')", env)
        assert hub.list_files("org/x") == []

``huggingface_hub`` reads ``HF_ENDPOINT`` at import time and the project's tests run with
``HF_HUB_OFFLINE=1``, so real client calls must run in a subprocess: :func:`hub_env` builds its
environment and :func:`run_client` runs ``python -c CODE`` and raises with its output on failure
(:func:`run_client_json` also returns what the script passed to ``out(obj)``).

Direct (no HTTP) access for seeding and assertions: ``hub.commit(repo_id, {path: bytes})``,
``hub.create_repo``, ``hub.head``, ``hub.files``, ``hub.list_files``, ``hub.read_file``,
``hub.branches``, ``hub.commits``, ``hub.repo_ids``, ``hub.request_log``,
``hub.downloaded_files(repo_id)``, ``hub.clear_log()``.

Model of a repo: branches (``main`` first) and pull-request refs (``refs/pr/N``) point at commits;
a commit is an immutable snapshot ``{path: bytes}`` with a 40-hex sha. ``create_repo`` makes an
initial empty commit on ``main`` (the real Hub adds a ``.gitattributes``; this one does not, so
``list_repo_files`` shows exactly what was uploaded). Every historical commit stays resolvable by
its sha. Uploads are always ``"uploadMode": "regular"`` (inline base64 in the commit NDJSON; no
LFS, no Xet), so clients must run with ``HF_HUB_DISABLE_XET=1`` (``hub_env`` sets it).

Endpoints served (``{type}`` is ``models``, ``datasets`` or ``spaces``; a repo id without a
namespace, e.g. ``tiny``, is stored as ``<user>/tiny``, like the Hub does for a user's repo):

    GET  /api/whoami-v2
    POST /api/repos/create                       200 {url} | 409 {error, url}
    POST|DELETE /api/repos/delete
    POST /api/validate-yaml                      200 {}
    GET  /api/{type}/{id}[/revision/{rev}]       {id, sha, siblings, ...}
    GET  /api/{type}/{id}/tree/{rev}[/{path}]    ?recursive=true
    POST /api/{type}/{id}/paths-info/{rev}
    GET  /api/{type}/{id}/refs, /commits/{rev}
    POST /api/{type}/{id}/preupload/{rev}
    POST /api/{type}/{id}/commit/{rev}           NDJSON; ?create_pr=1 opens refs/pr/N
    POST|DELETE /api/{type}/{id}/branch/{name}   {"startingPoint": rev}
    POST /api/{type}/{id}/discussions            {title, description, pullRequest} -> {num}
    GET  /api/{type}/{id}/discussions/{num}
    HEAD|GET /[{type}/]{id}/resolve/{rev}/{path} X-Repo-Commit, ETag, Content-Length, Range

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and a
JSON body ``{"error": ...}``. Write requests (create/delete repo, preupload, commit, branch,
discussions) need ``Authorization: Bearer <token>``; a missing or wrong token gets 401 with
``X-Error-Message: Invalid credentials in Authorization header`` (the client then raises a plain
``HfHubHTTPError`` with status 401). Reads need no token; private repos are not enforced.
An unexpected server bug answers 400 (not 5xx, which the client retries for ~24 s) with the
traceback in the body, and is recorded in ``hub.errors``.

Standalone: ``python tests/hub_server.py --port 0`` prints ``LocalHub listening on URL`` (and the
token) and serves until interrupted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "ClientError", "hub_env", "run_client", "run_client_json", "git_blob_sha"]

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "user"
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = {
    "revision",
    "tree",
    "preupload",
    "commit",
    "branch",
    "refs",
    "commits",
    "paths-info",
    "discussions",
}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


def git_blob_sha(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub uses as ETag/oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


class _Commit:
    __slots__ = ("sha", "parent", "files", "oids", "title", "message", "date")

    def __init__(self, sha, parent, files, title, message):
        self.sha: str = sha
        self.parent: str | None = parent
        self.files: dict[str, bytes] = files
        self.oids: dict[str, str] = {p: git_blob_sha(b) for p, b in files.items()}
        self.title: str = title
        self.message: str = message
        self.date: str = _now_iso()


class _Repo:
    def __init__(self, repo_id: str, repo_type: str, private: bool):
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.private = private
        self.created_at = _now_iso()
        self.refs: dict[str, str] = {}  # "main", "dev", "refs/pr/1" -> commit sha
        self.commits: dict[str, _Commit] = {}
        self.discussions: dict[int, dict] = {}

    def resolve(self, rev: str | None) -> str | None:
        """Branch, ``refs/heads/x``, ``refs/pr/N`` or any known commit sha -> commit sha."""
        rev = rev or "main"
        if rev in self.refs:
            return self.refs[rev]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/"):] in self.refs:
            return self.refs[rev[len("refs/heads/"):]]
        if _SHA_RE.match(rev) and rev in self.commits:
            return rev
        return None

    def ref_name(self, rev: str) -> str | None:
        """The ref a commit may be written to (a branch or a PR ref), or None."""
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        if rev in self.refs:
            return rev
        return None


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers=None, extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class _Response:
    __slots__ = ("status", "headers", "body", "length")

    def __init__(self, status=200, body=b"", headers=None, length=None):
        self.status = status
        self.headers = dict(headers or {})
        self.body = body
        self.length = len(body) if length is None else length


def _json_response(obj, status=200, headers=None) -> _Response:
    body = json.dumps(obj).encode()
    h = {"Content-Type": "application/json; charset=utf-8"}
    h.update(headers or {})
    return _Response(status, body, h)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, hub):
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # idle keep-alive connections are dropped after this

    def log_message(self, format, *args):  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0] or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str):
        hub: LocalHub = self.server.hub
        body = self._read_body()
        split = urlsplit(self.path)
        # Split on "/" *before* decoding: revisions arrive as "refs%2Fpr%2F1".
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        hub._log(method, "/" + "/".join(segs), self.headers.get("Range"))
        try:
            resp = hub._route(method, segs, query, self.headers, body)
        except _HttpError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            resp = _json_response({"error": e.message, **e.extra}, e.status, headers)
        except Exception:  # a bug here: 4xx so that the client does not retry for ~24 s
            tb = traceback.format_exc()
            hub.errors.append(tb)
            sys.stderr.write(f"LocalHub internal error on {method} {self.path}\n{tb}")
            resp = _json_response({"error": f"LocalHub internal error:\n{tb}"}, 400)
        self._send(method, resp)

    def _send(self, method: str, resp: _Response):
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(resp.length))
        self.end_headers()
        if method != "HEAD" and resp.body:
            self.wfile.write(resp.body)
        self.wfile.flush()


class LocalHub:
    """An in-memory Hub on ``127.0.0.1:<free port>``, served from a daemon thread.

    Use as ``with LocalHub() as hub: ...`` (or :meth:`start` / :meth:`stop`).

    Attributes: ``endpoint`` (``"http://127.0.0.1:PORT"``), ``port``, ``token``, ``user``,
    ``request_log`` (list of ``(method, decoded_path)``, query string dropped), ``errors``
    (tracebacks of server bugs).
    """

    def __init__(self, token: str | None = DEFAULT_TOKEN, *, user: str = DEFAULT_USER,
                 host: str = "127.0.0.1", port: int = 0):
        self.token = token
        self.user = user
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.request_log: list[tuple[str, str]] = []
        self.range_log: list[tuple[str, str, str | None]] = []  # (method, path, Range header or None)
        self.errors: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        self._server = _Server((self.host, self._requested_port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"LocalHub:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open keep-alive connections (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Start (if needed) and block until KeyboardInterrupt; for the standalone mode."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # ------------------------------------------------------------------ direct access for tests
    def _log(self, method: str, path: str, byte_range: str | None = None) -> None:
        with self._lock:
            self.request_log.append((method, path))
            self.range_log.append((method, path, byte_range))

    def clear_log(self) -> None:
        with self._lock:
            self.request_log.clear()

    def downloaded_files(self, repo_id: str | None = None, repo_type: str = "model") -> list[str]:
        """Paths of files fetched with GET .../resolve/<rev>/<path> (in request order)."""
        out = []
        for method, path in list(self.request_log):
            if method != "GET":
                continue
            segs = path.split("/")[1:]
            if repo_type != "model":
                if not segs or segs[0] != repo_type + "s":
                    continue
                segs = segs[1:]
            if len(segs) >= 5 and segs[2] == "resolve":
                rid = f"{segs[0]}/{segs[1]}"
                rest = segs[4:]
            elif len(segs) >= 4 and segs[1] == "resolve":
                rid = f"{self.user}/{segs[0]}"
                rest = segs[3:]
            else:
                continue
            if repo_id is None or self._canonical(repo_id) == rid:
                out.append("/".join(rest))
        return out

    def _canonical(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"

    def _get_repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        repo = self._repos.get((repo_type, self._canonical(repo_id)))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (t, rid) in self._repos if t == repo_type)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                    exist_ok: bool = True) -> str:
        """Create a repo directly (no HTTP); returns its canonical id."""
        with self._lock:
            rid = self._canonical(repo_id)
            if (repo_type, rid) in self._repos:
                if not exist_ok:
                    raise ValueError(f"repo {rid} exists")
                return rid
            repo = _Repo(rid, repo_type, private)
            self._repos[(repo_type, rid)] = repo
            repo.refs["main"] = self._new_commit(repo, None, {}, "initial commit", "").sha
            return rid

    def commit(self, repo_id: str, files: Mapping[str, bytes | str] | None = None, *,
               delete: Iterable[str] = (), branch: str = "main", message: str = "commit",
               repo_type: str = "model") -> str:
        """Commit directly (no HTTP), creating the repo/branch as needed; returns the sha."""
        with self._lock:
            self.create_repo(repo_id, repo_type)
            repo = self._get_repo(repo_id, repo_type)
            if branch not in repo.refs:
                repo.refs[branch] = repo.refs["main"]
            parent = repo.commits[repo.refs[branch]]
            new_files = dict(parent.files)
            for p in delete:
                new_files.pop(p, None)
            for p, data in (files or {}).items():
                new_files[p] = data.encode() if isinstance(data, str) else bytes(data)
            sha = self._new_commit(repo, parent.sha, new_files, message, "").sha
            repo.refs[branch] = sha
            return sha

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha a revision points to (KeyError if unknown)."""
        with self._lock:
            sha = self._get_repo(repo_id, repo_type).resolve(revision)
            if sha is None:
                raise KeyError(f"unknown revision {revision!r} in {repo_id}")
            return sha

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot ``{path: bytes}`` at a revision (branch, PR ref or commit sha)."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return dict(repo.commits[self.head(repo_id, revision, repo_type)].files)

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return sorted(self.files(repo_id, revision, repo_type))

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return self.files(repo_id, revision, repo_type)[path]

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """``{ref: sha}`` including PR refs (``refs/pr/N``)."""
        with self._lock:
            return dict(self._get_repo(repo_id, repo_type).refs)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas from ``revision`` back to the initial commit (newest first)."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            out, sha = [], self.head(repo_id, revision, repo_type)
            while sha is not None:
                out.append(sha)
                sha = repo.commits[sha].parent
            return out

    # ------------------------------------------------------------------ internals
    def _new_commit(self, repo: _Repo, parent: str | None, files: dict[str, bytes],
                    title: str, message: str) -> _Commit:
        self._counter += 1
        h = hashlib.sha1()
        h.update(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{self._counter}\n{title}\n{message}\n".encode())
        for p in sorted(files):
            h.update(f"{p}\0{git_blob_sha(files[p])}\n".encode())
        c = _Commit(h.hexdigest(), parent, files, title, message)
        repo.commits[c.sha] = c
        return c

    def _url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _check_auth(self, headers) -> None:
        if self.token is None:
            return
        auth = headers.get("Authorization") or ""
        if not auth:
            raise _HttpError(401, "LocalHub: missing 'Authorization: Bearer <token>' header on a write request",
                             headers={"X-Error-Message": _BAD_TOKEN_MESSAGE})
        if auth != f"Bearer {self.token}":
            raise _HttpError(401, "LocalHub: invalid token (Authorization: Bearer <token> does not match)",
                             headers={"X-Error-Message": _BAD_TOKEN_MESSAGE})

    def _find_repo(self, repo_type: str, rest: list[str], actions: set[str]) -> tuple[str, list[str]]:
        """Split ``rest`` into (canonical repo id, remaining segments); handles ids without a namespace."""
        if not rest or not rest[0]:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        if len(rest) == 1:
            return self._canonical(rest[0]), []
        two = f"{rest[0]}/{rest[1]}"
        if (repo_type, two) in self._repos:
            return two, rest[2:]
        one = self._canonical(rest[0])
        if rest[1] in actions and (repo_type, one) in self._repos:
            return one, rest[1:]
        return two, rest[2:]

    def _repo_or_404(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _rev_or_404(self, repo: _Repo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    @staticmethod
    def _json_body(body: bytes) -> dict:
        if not body:
            return {}
        try:
            data = json.loads(body)
        except ValueError as e:
            raise _HttpError(400, f"Invalid JSON body: {e}")
        if not isinstance(data, dict):
            raise _HttpError(400, "JSON body must be an object")
        return data

    def _route(self, method: str, segs: list[str], query: dict, headers, body: bytes) -> _Response:
        if method == "HEAD":  # HEAD is GET without a body (the handler drops it)
            method = "GET"
        with self._lock:
            if segs and segs[0] == "api":
                return self._route_api(method, segs[1:], query, headers, body)
            repo_type = "model"
            rest = segs
            if rest and rest[0] in ("datasets", "spaces"):
                repo_type, rest = _REPO_TYPES[rest[0]], rest[1:]
            repo_id, rest = self._find_repo(repo_type, rest, {"resolve"})
            if method == "GET" and len(rest) >= 3 and rest[0] == "resolve":
                return self._resolve(repo_type, repo_id, rest[1], "/".join(rest[2:]), headers)
            raise _HttpError(404, f"Not found: /{'/'.join(segs)}")

    def _route_api(self, method, segs, query, headers, body) -> _Response:
        if segs == ["whoami-v2"] and method == "GET":
            self._check_auth(headers)
            return _json_response({
                "type": "user", "id": "0" * 24, "name": self.user, "fullname": "LocalHub Test User",
                "email": None, "emailVerified": False, "isPro": False, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            })
        if segs == ["validate-yaml"] and method == "POST":
            return _json_response({})
        if segs == ["repos", "create"] and method == "POST":
            self._check_auth(headers)
            return self._api_create_repo(self._json_body(body))
        if segs == ["repos", "delete"] and method in ("POST", "DELETE"):
            self._check_auth(headers)
            data = self._json_body(body)
            rid = f"{data.get('organization') or self.user}/{data.get('name')}"
            if self._repos.pop((data.get("type") or "model", rid), None) is None:
                raise _HttpError(404, f"Repository not found: {rid}", "RepoNotFound")
            return _json_response({})
        if len(segs) >= 2 and segs[0] in _REPO_TYPES:
            repo_type = _REPO_TYPES[segs[0]]
            repo_id, rest = self._find_repo(repo_type, segs[1:], _API_ACTIONS)
            return self._route_repo(method, repo_type, repo_id, rest, query, headers, body)
        raise _HttpError(404, f"Not found: /api/{'/'.join(segs)}")

    def _route_repo(self, method, repo_type, repo_id, rest, query, headers, body) -> _Response:
        action = rest[0] if rest else None
        if method in ("POST", "PUT", "DELETE"):
            self._check_auth(headers)
        repo = self._repo_or_404(repo_type, repo_id)
        if method == "GET" and action is None:
            return self._api_info(repo, "main")
        if method == "GET" and action == "revision" and len(rest) == 2:
            return self._api_info(repo, rest[1])
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._api_tree(repo, rest[1], "/".join(rest[2:]), query)
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            return self._api_paths_info(repo, rest[1], body, headers)
        if method == "GET" and action == "refs" and len(rest) == 1:
            return self._api_refs(repo)
        if method == "GET" and action == "commits" and len(rest) == 2:
            return self._api_commits(repo, rest[1])
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._api_preupload(repo, rest[1], self._json_body(body), query)
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self._api_commit(repo, rest[1], body, query)
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._api_branch(repo, rest[1], method, self._json_body(body))
        if action == "discussions" and method == "POST" and len(rest) == 1:
            return self._api_create_discussion(repo, self._json_body(body))
        if action == "discussions" and method == "GET" and len(rest) == 2:
            return self._api_discussion(repo, rest[1])
        raise _HttpError(404, f"Not found: {method} {action} on {repo_id}")

    # ---- endpoints
    def _api_create_repo(self, data: dict) -> _Response:
        name = data.get("name")
        if not name or not isinstance(name, str) or "/" in name:
            raise _HttpError(400, f"Invalid repo name: {name!r}")
        repo_type = data.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type!r}")
        rid = f"{data.get('organization') or self.user}/{name}"
        existing = self._repos.get((repo_type, rid))
        if existing is not None:
            return _json_response({"error": "You already created this model repo", "url": self._url(existing)}, 409)
        private = bool(data.get("private")) or data.get("visibility") == "private"
        self.create_repo(rid, repo_type, private=private)
        repo = self._repos[(repo_type, rid)]
        return _json_response({"url": self._url(repo), "name": rid, "id": rid})

    def _entries(self, commit: _Commit) -> tuple[dict[str, dict], dict[str, str]]:
        """(file entries by path, directory oid by path) of a commit."""
        files = {
            p: {"type": "file", "path": p, "size": len(b), "oid": commit.oids[p]}
            for p, b in commit.files.items()
        }
        dirs: dict[str, list[str]] = {}
        for p in commit.files:
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.setdefault("/".join(parts[:i]), []).append(p)
        dir_oids = {
            d: hashlib.sha1("".join(f"{p}{commit.oids[p]}" for p in sorted(ps)).encode()).hexdigest()
            for d, ps in dirs.items()
        }
        return files, dir_oids

    def _api_info(self, repo: _Repo, rev: str) -> _Response:
        sha = self._rev_or_404(repo, rev)
        commit = repo.commits[sha]
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": p, "size": len(commit.files[p]), "blobId": commit.oids[p]}
                for p in sorted(commit.files)
            ],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return _json_response(info)

    def _api_tree(self, repo: _Repo, rev: str, path: str, query: dict) -> _Response:
        sha = self._rev_or_404(repo, rev)
        files, dir_oids = self._entries(repo.commits[sha])
        path = path.strip("/")
        if path and path not in dir_oids:
            if path in files:
                raise _HttpError(400, f"{path} is a file, not a directory")
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        recursive = str(query.get("recursive", "")).lower() in ("1", "true", "yes")
        prefix = path + "/" if path else ""
        out = []
        for d in sorted(dir_oids):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                out.append({"type": "directory", "path": d, "oid": dir_oids[d], "size": 0})
        for p in sorted(files):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                out.append(files[p])
        out.sort(key=lambda e: e["path"])
        return _json_response(out)

    def _api_paths_info(self, repo: _Repo, rev: str, body: bytes, headers) -> _Response:
        sha = self._rev_or_404(repo, rev)
        ctype = headers.get("Content-Type") or ""
        if "json" in ctype:
            paths = self._json_body(body).get("paths") or []
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        files, dir_oids = self._entries(repo.commits[sha])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(files[p])
            elif p in dir_oids:
                out.append({"type": "directory", "path": p, "oid": dir_oids[p], "size": 0})
        return _json_response(out)

    def _api_refs(self, repo: _Repo) -> _Response:
        branches = [{"name": r, "ref": f"refs/heads/{r}", "targetCommit": s}
                    for r, s in repo.refs.items() if not r.startswith("refs/")]
        prs = [{"name": r, "ref": r, "targetCommit": s} for r, s in repo.refs.items() if r.startswith("refs/pr/")]
        return _json_response({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _api_commits(self, repo: _Repo, rev: str) -> _Response:
        sha = self._rev_or_404(repo, rev)
        out = []
        while sha is not None:
            c = repo.commits[sha]
            out.append({"id": c.sha, "title": c.title, "message": c.message,
                        "authors": [{"user": self.user}], "date": c.date})
            sha = c.parent
        return _json_response(out)

    def _api_preupload(self, repo: _Repo, rev: str, data: dict, query: dict) -> _Response:
        sha = repo.resolve(rev)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        commit = repo.commits[sha]
        out = []
        for f in data.get("files") or []:
            p = f.get("path")
            entry = {"path": p, "uploadMode": "regular", "shouldIgnore": False}
            if p in commit.oids:
                entry["oid"] = commit.oids[p]  # lets the client skip unchanged files
            out.append(entry)
        return _json_response({"files": out, "commitOid": sha})

    @staticmethod
    def _check_path(path) -> str:
        if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
            raise _HttpError(400, f"Invalid path in repo: {path!r}")
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise _HttpError(400, f"Invalid path in repo: {path!r}")
        return path

    def _api_commit(self, repo: _Repo, rev: str, body: bytes, query: dict) -> _Response:
        create_pr = str(query.get("create_pr", "")).lower() in ("1", "true")
        ops = []
        header: dict = {}
        for n, line in enumerate(body.splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as e:
                raise _HttpError(400, f"Invalid NDJSON line {n}: {e}")
            if key == "header":
                header = value
            else:
                ops.append((key, value))
        summary = (header.get("summary") or "").strip()
        if not summary:
            raise _HttpError(400, "Commit summary (message) is required")
        description = header.get("description") or ""

        if create_pr:
            base_sha = repo.resolve(rev)
            if base_sha is None:
                raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            ref = None
        else:
            ref = repo.ref_name(rev)
            if ref is None:
                code = None if _SHA_RE.match(rev) else "RevisionNotFound"
                raise _HttpError(400 if code is None else 404,
                                 f"Invalid rev id: {rev} (commits must target a branch or a PR ref)", code)
            base_sha = repo.refs[ref]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base_sha:
                raise _HttpError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(repo.commits[base_sha].files)
        for key, value in ops:
            path = value.get("path") if isinstance(value, dict) else None
            if key == "file":
                self._check_path(path)
                enc = value.get("encoding", "base64")
                content = value.get("content", "")
                try:
                    data = base64.b64decode(content, validate=True) if enc == "base64" else content.encode()
                except (ValueError, TypeError) as e:
                    raise _HttpError(400, f"Invalid base64 content for {path}: {e}")
                files[path] = data
            elif key == "deletedFile":
                self._check_path(path)
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = self._check_path(path.rstrip("/") if isinstance(path, str) else path) + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise _HttpError(400, "LocalHub stores regular files only (it always answers uploadMode "
                                      "'regular'); set HF_HUB_DISABLE_XET=1 in the client")
            else:
                raise _HttpError(400, f"Unsupported commit operation: {key!r}")

        commit = self._new_commit(repo, base_sha, files, summary, description)
        out = {"commitOid": commit.sha, "commitUrl": f"{self._url(repo)}/commit/{commit.sha}",
               "success": True}
        if create_pr:
            num = self._open_pr(repo, summary, description, base_ref=rev)
            repo.refs[f"refs/pr/{num}"] = commit.sha
            out["pullRequestUrl"] = f"{self._url(repo)}/discussions/{num}"
        else:
            repo.refs[ref] = commit.sha
        return _json_response(out)

    def _open_pr(self, repo: _Repo, title: str, description: str, base_ref: str = "main",
                 pull_request: bool = True) -> int:
        num = max(repo.discussions, default=0) + 1
        base = base_ref if base_ref.startswith("refs/") else f"refs/heads/{base_ref}"
        repo.discussions[num] = {
            "num": num, "title": title, "description": description, "isPullRequest": pull_request,
            "status": "draft" if pull_request else "open", "createdAt": _now_iso(), "base": base,
        }
        return num

    def _api_branch(self, repo: _Repo, name: str, method: str, data: dict) -> _Response:
        if method == "DELETE":
            if name not in repo.refs or name.startswith("refs/"):
                raise _HttpError(404, f"Branch not found: {name}", "RevisionNotFound")
            if name == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            del repo.refs[name]
            return _json_response({})
        if not name or name.startswith("refs/") or _SHA_RE.match(name):
            raise _HttpError(400, f"Invalid branch name: {name!r}")
        if name in repo.refs:
            raise _HttpError(409, f"Reference already exists: refs/heads/{name}")
        start = data.get("startingPoint") or "main"
        repo.refs[name] = self._rev_or_404(repo, start)
        return _json_response({})

    def _api_create_discussion(self, repo: _Repo, data: dict) -> _Response:
        title = (data.get("title") or "").strip()
        if len(title) < 3:
            raise _HttpError(400, "Discussion title must be at least 3 characters long")
        pr = bool(data.get("pullRequest"))
        num = self._open_pr(repo, title, data.get("description") or "", "main", pull_request=pr)
        if pr:
            repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
        return _json_response({"num": num, "pullRequest": pr,
                               "url": f"{self._url(repo)}/discussions/{num}"})

    def _api_discussion(self, repo: _Repo, num: str) -> _Response:
        try:
            d = repo.discussions[int(num)]
        except (ValueError, KeyError):
            raise _HttpError(404, f"Discussion not found: {num}")
        details = {
            "num": d["num"], "title": d["title"], "status": d["status"], "createdAt": d["createdAt"],
            "author": {"name": self.user}, "isPullRequest": d["isPullRequest"],
            "repo": {"name": repo.repo_id, "type": repo.repo_type}, "events": [], "pinned": False,
            "changes": {"base": d["base"]}, "filesWithConflicts": [], "diff": "",
        }
        return _json_response(details)

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str, headers) -> _Response:
        repo = self._repo_or_404(repo_type, repo_id)
        sha = self._rev_or_404(repo, rev)
        commit = repo.commits[sha]
        if path not in commit.files:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = commit.files[path]
        h = {
            "X-Repo-Commit": sha,
            "ETag": f'"{commit.oids[path]}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        rng = headers.get("Range")
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng or "")
        if m and (m.group(1) or m.group(2)):
            size = len(data)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: last N bytes
                start, end = max(size - int(m.group(2)), 0), size - 1
            if start >= size or start > end:
                raise _HttpError(416, "Requested range not satisfiable",
                                 headers={"Content-Range": f"bytes */{size}", **h})
            h["Content-Range"] = f"bytes {start}-{end}/{size}"
            return _Response(206, data[start:end + 1], h)
        return _Response(200, data, h)


# ---------------------------------------------------------------------- client-side helpers
class ClientError(AssertionError):
    """A client subprocess failed; ``result`` is the CompletedProcess."""

    def __init__(self, message: str, result: subprocess.CompletedProcess):
        super().__init__(message)
        self.result = result


_ENV_DROP = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE", "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING", "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE",
)


def hub_env(hub, hf_home, **extra: str) -> dict[str, str]:
    """``os.environ`` set up for a client subprocess talking to ``hub`` with a fresh ``hf_home``.

    ``hub`` is a :class:`LocalHub` (or anything with ``endpoint`` and ``token``). Sets HF_ENDPOINT,
    HF_TOKEN, HF_HOME, HF_HUB_OFFLINE=0 (and TRANSFORMERS_OFFLINE=0, HF_DATASETS_OFFLINE=0),
    HF_HUB_DISABLE_XET=1, HF_HUB_DISABLE_TELEMETRY=1, quiet progress bars, and drops variables that
    would point the caches or the token elsewhere. ``extra`` overrides anything.
    """
    env = dict(os.environ)
    for k in _ENV_DROP:
        env.pop(k, None)
    hf_home = Path(hf_home)
    hf_home.mkdir(parents=True, exist_ok=True)
    env.update({
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "PYTHONUNBUFFERED": "1",
    })
    if hub.token is not None:
        env["HF_TOKEN"] = hub.token
    else:
        env.pop("HF_TOKEN", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # the test machines are small and shared
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_client(code: str, env: Mapping[str, str], timeout: float = 120, *, cwd=None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sys.executable -c code`` (dedented) with ``env``; raise :class:`ClientError` with its
    stdout/stderr if it exits non-zero (unless ``check=False``) or runs past ``timeout`` seconds."""
    code = textwrap.dedent(code)
    try:
        result = subprocess.run([sys.executable, "-c", code], env=dict(env), cwd=cwd,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        cp = subprocess.CompletedProcess(e.cmd, -9, out, err)
        raise ClientError(f"client timed out after {timeout}s\n--- stdout ---\n{out}\n--- stderr ---\n{err}", cp)
    if check and result.returncode != 0:
        raise ClientError(
            f"client exited with {result.returncode}\n--- code ---\n{code}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}", result)
    return result


_JSON_PRELUDE = """\
import json, os, sys, time
def out(obj):
    print("RESULT:" + json.dumps(obj), flush=True)
"""


def run_client_json(code: str, env: Mapping[str, str], timeout: float = 120, *, cwd=None):
    """Like :func:`run_client`, with ``json, os, sys, time`` imported and an ``out(obj)`` function
    defined in the script; returns the object passed to the last ``out(...)`` call."""
    result = run_client(_JSON_PRELUDE + textwrap.dedent(code), env, timeout=timeout, cwd=cwd)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT:")]
    if not lines:
        raise ClientError(f"client printed no RESULT line (call out(obj))\n--- stdout ---\n"
                          f"{result.stdout}\n--- stderr ---\n{result.stderr}", result)
    return json.loads(lines[-1][len("RESULT:"):])


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serve an in-memory Hugging Face Hub for tests.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    ap.add_argument("--token", default=DEFAULT_TOKEN, help="write token; '' disables auth")
    ap.add_argument("--user", default=DEFAULT_USER)
    args = ap.parse_args(argv)
    hub = LocalHub(token=args.token or None, user=args.user, host=args.host, port=args.port).start()
    print(f"LocalHub listening on {hub.endpoint}", flush=True)
    print(f"token: {hub.token}", flush=True)
    import signal

    def _on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    hub.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
