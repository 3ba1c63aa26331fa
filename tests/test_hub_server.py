"""End-to-end tests of tests/hub_server.py with the real huggingface_hub / transformers clients.

The clients run in subprocesses (huggingface_hub reads HF_ENDPOINT at import time and the test
session runs with HF_HUB_OFFLINE=1); each subprocess prints one JSON line that the test checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from tests.hub_server import LocalHub, git_blob_sha, hub_env, run_client_json
except ImportError:  # only tests/ on sys.path (e.g. a bare `pytest` run)
    from hub_server import LocalHub, git_blob_sha, hub_env, run_client_json

HUB_SERVER = Path(__file__).with_name("hub_server.py")


def client(code: str, env: dict, timeout: float = 120):
    """Run ``code`` in a client subprocess; it reports back with ``out(obj)`` (JSON)."""
    return run_client_json(code, env, timeout=timeout)


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as h:
        yield h
    assert not h.errors, "server-side errors:\n" + "\n".join(h.errors)


@pytest.fixture
def env(hub, tmp_path):
    return hub_env(hub, tmp_path / "hf_home")


def _http(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---------------------------------------------------------------------------- raw HTTP (no client)
def test_raw_http_shapes(hub):
    sha = hub.commit("raw/repo", {"a.txt": b"hello world", "d/b.bin": bytes(range(10))})
    base = hub.endpoint

    status, h, body = _http("HEAD", f"{base}/raw/repo/resolve/main/a.txt")
    assert status == 200 and body == b""
    assert h["X-Repo-Commit"] == sha
    assert h["ETag"] == f'"{git_blob_sha(b"hello world")}"'
    assert h["Content-Length"] == "11"

    status, h, body = _http("GET", f"{base}/raw/repo/resolve/{sha}/d/b.bin", headers={"Range": "bytes=4-"})
    assert status == 206 and body == bytes(range(4, 10)) and h["Content-Range"] == "bytes 4-9/10"

    for url, code in [
        (f"{base}/raw/nope/resolve/main/a.txt", "RepoNotFound"),
        (f"{base}/raw/repo/resolve/nope/a.txt", "RevisionNotFound"),
        (f"{base}/raw/repo/resolve/main/nope.txt", "EntryNotFound"),
        (f"{base}/api/models/raw/repo/revision/nope", "RevisionNotFound"),
    ]:
        status, h, body = _http("GET", url)
        assert (status, h.get("X-Error-Code")) == (404, code), url
        assert "error" in json.loads(body) and int(h["Content-Length"]) == len(body)
        status, h, body = _http("HEAD", url)  # HEAD: no body, the header is the only signal
        assert (status, h.get("X-Error-Code"), body) == (404, code, b"")

    status, _, body = _http("GET", f"{base}/api/models/raw/repo/tree/main?recursive=true")
    assert [(e["type"], e["path"]) for e in json.loads(body)] == [
        ("file", "a.txt"), ("directory", "d"), ("file", "d/b.bin")]
    status, _, body = _http("GET", f"{base}/api/models/raw/repo/tree/main/d")
    assert [e["path"] for e in json.loads(body)] == ["d/b.bin"]

    # writes need the token
    payload = json.dumps({"name": "x", "organization": "raw"}).encode()
    ctype = {"Content-Type": "application/json"}
    status, h, body = _http("POST", f"{base}/api/repos/create", payload, ctype)
    assert status == 401 and "error" in json.loads(body)
    status, h, body = _http("POST", f"{base}/api/repos/create", payload,
                            {**ctype, "Authorization": f"Bearer {hub.token}"})
    assert status == 200 and json.loads(body)["url"] == f"{base}/raw/x"
    status, h, body = _http("POST", f"{base}/api/repos/create", payload,
                            {**ctype, "Authorization": f"Bearer {hub.token}"})
    assert status == 409 and json.loads(body)["url"] == f"{base}/raw/x"
    assert ("HEAD", "/raw/repo/resolve/main/a.txt") in hub.request_log


def test_standalone_mode():
    proc = subprocess.Popen([sys.executable, str(HUB_SERVER), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LocalHub listening on http://127.0.0.1:"), line
        endpoint = line.split()[-1]
        status, _, body = _http("GET", f"{endpoint}/api/whoami-v2",
                                headers={"Authorization": "Bearer hf_test_token"})
        assert status == 200 and json.loads(body)["name"] == "user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


# ---------------------------------------------------------------------------- real huggingface_hub
def test_create_upload_list_info_download(hub, env):
    res = client(r"""
    from huggingface_hub import (HfApi, create_repo, upload_folder, hf_hub_download,
                                 snapshot_download, list_repo_files, model_info)
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    url = create_repo("org/basic")
    url2 = create_repo("org/basic", exist_ok=True)
    try:
        create_repo("org/basic")
        dup = None
    except HfHubHTTPError as e:
        dup = e.response.status_code
    solo = create_repo("solo")  # no namespace -> the token's user
    api.upload_file(path_or_fileobj=b"solo!", path_in_repo="f.txt", repo_id="solo")
    solo_files = list_repo_files("user/solo")

    import tempfile
    d = tempfile.mkdtemp()
    os.makedirs(os.path.join(d, "sub"))
    open(os.path.join(d, "config.json"), "w").write('{"a": 1}')
    open(os.path.join(d, "sub", "w.bin"), "wb").write(bytes(range(256)) * 8)
    c1 = upload_folder(repo_id="org/basic", folder_path=d)
    c2 = api.upload_file(path_or_fileobj=b"extra", path_in_repo="extra.txt", repo_id="org/basic")
    files = list_repo_files("org/basic")
    info = model_info("org/basic")
    info1 = model_info("org/basic", revision=c1.oid)
    p = hf_hub_download("org/basic", "sub/w.bin")
    snap = snapshot_download("org/basic")
    snap_files = sorted(os.path.relpath(os.path.join(r, f), snap)
                        for r, _, fs in os.walk(snap) for f in fs)
    out({
        "url": url, "url2": url2, "dup": dup, "solo": solo, "solo_files": solo_files,
        "c1": c1.oid, "c2": c2.oid, "files": files,
        "info": [info.id, info.sha, sorted(s.rfilename for s in info.siblings)],
        "info1": [info1.sha, sorted(s.rfilename for s in info1.siblings)],
        "w_ok": open(p, "rb").read() == bytes(range(256)) * 8, "w_commit": p.split(os.sep)[-3],
        "snap_files": snap_files,
        "snap_config": open(os.path.join(snap, "config.json")).read(),
    })
    """, env)
    assert res["url"] == res["url2"] == f"{hub.endpoint}/org/basic"
    assert res["dup"] == 409
    assert res["solo"] == f"{hub.endpoint}/user/solo" and res["solo_files"] == ["f.txt"]
    assert res["files"] == ["config.json", "extra.txt", "sub/w.bin"]
    assert res["info"] == ["org/basic", res["c2"], res["files"]]
    assert res["info1"] == [res["c1"], ["config.json", "sub/w.bin"]]
    assert res["w_ok"] and res["w_commit"] == res["c2"]
    assert res["snap_files"] == [str(Path(f)) for f in res["files"]]
    assert res["snap_config"] == '{"a": 1}'
    # server side agrees
    assert hub.head("org/basic") == res["c2"]
    assert hub.read_file("org/basic", "extra.txt") == b"extra"
    assert hub.commits("org/basic")[:2] == [res["c2"], res["c1"]]
    # hf_hub_download fetched w.bin; snapshot_download reused that blob and fetched the rest
    assert sorted(hub.downloaded_files("org/basic")) == ["config.json", "extra.txt", "sub/w.bin"]


def test_history_download_by_old_sha(hub, env):
    res = client(r"""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError
    api = HfApi()
    api.create_repo("org/hist")
    c1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.txt", repo_id="org/hist")
    api.upload_file(path_or_fileobj=b"gone", path_in_repo="old/a.txt", repo_id="org/hist")
    api.upload_file(path_or_fileobj=b"gone", path_in_repo="old/b.txt", repo_id="org/hist")
    c3 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id="org/hist")
    c4 = api.delete_folder("old", repo_id="org/hist")
    old = open(hf_hub_download("org/hist", "w.txt", revision=c1.oid), "rb").read()
    new = open(hf_hub_download("org/hist", "w.txt"), "rb").read()
    from_c3 = open(hf_hub_download("org/hist", "old/a.txt", revision=c3.oid), "rb").read()
    try:
        hf_hub_download("org/hist", "old/a.txt")
        gone = None
    except EntryNotFoundError as e:
        gone = type(e).__name__
    snap1 = snapshot_download("org/hist", revision=c1.oid)
    commits = [c.commit_id for c in api.list_repo_commits("org/hist")]
    out({"c1": c1.oid, "c3": c3.oid, "c4": c4.oid, "old": old.decode(), "new": new.decode(),
         "from_c3": from_c3.decode(), "gone": gone, "snap1": sorted(os.listdir(snap1)),
         "snap1_commit": os.path.basename(snap1), "commits": commits,
         "files": api.list_repo_files("org/hist")})
    """, env)
    assert (res["old"], res["new"], res["from_c3"]) == ("v1", "v2", "gone")
    assert res["gone"] == "RemoteEntryNotFoundError"
    assert res["snap1"] == ["w.txt"] and res["snap1_commit"] == res["c1"]
    assert res["commits"][0] == res["c4"] and res["commits"][-1] == hub.commits("org/hist")[-1]
    assert len(res["commits"]) == 6  # initial + 5
    assert res["files"] == ["w.txt"]
    assert len({res["c1"], res["c3"], res["c4"]}) == 3


def test_branch_and_pull_requests(hub, env):
    res = client(r"""
    from huggingface_hub import HfApi, hf_hub_download, CommitOperationAdd
    import tempfile
    api = HfApi()
    api.create_repo("org/br")
    main1 = api.upload_file(path_or_fileobj=b"main", path_in_repo="x.txt", repo_id="org/br")
    api.create_branch("org/br", branch="dev")
    api.create_branch("org/br", branch="dev", exist_ok=True)
    dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="x.txt", repo_id="org/br", revision="dev")
    x_dev = open(hf_hub_download("org/br", "x.txt", revision="dev"), "rb").read().decode()
    x_main = open(hf_hub_download("org/br", "x.txt"), "rb").read().decode()
    refs = api.list_repo_refs("org/br", include_pull_requests=True)

    # create_pr=True on upload_folder (no Xet: goes through commit?create_pr=1)
    d = tempfile.mkdtemp()
    open(os.path.join(d, "x.txt"), "w").write("pr")
    open(os.path.join(d, "new.txt"), "w").write("new")
    pr = api.upload_folder(repo_id="org/br", folder_path=d, create_pr=True)
    pr_files = api.list_repo_files("org/br", revision="refs/pr/1")
    x_pr = open(hf_hub_download("org/br", "x.txt", revision="refs/pr/1"), "rb").read().decode()

    # explicit PR through the discussions endpoints, then a commit to its ref
    pr2 = api.create_pull_request("org/br", title="second pr")
    api.create_commit("org/br", [CommitOperationAdd("pr2.txt", b"2")], commit_message="pr2",
                      revision=pr2.git_reference)
    pr2_files = api.list_repo_files("org/br", revision=pr2.git_reference)
    out({"main1": main1.oid, "dev": dev.oid, "x_dev": x_dev, "x_main": x_main,
         "branches": sorted((b.name, b.target_commit) for b in refs.branches),
         "pr_url": pr.pr_url, "pr_files": pr_files, "x_pr": x_pr,
         "main_files": api.list_repo_files("org/br"),
         "pr2": [pr2.num, pr2.git_reference, pr2.is_pull_request], "pr2_files": pr2_files})
    """, env)
    assert (res["x_dev"], res["x_main"]) == ("dev", "main")
    assert res["branches"] == [["dev", res["dev"]], ["main", res["main1"]]]
    assert res["pr_url"] == f"{hub.endpoint}/org/br/discussions/1"
    assert res["pr_files"] == ["new.txt", "x.txt"] and res["x_pr"] == "pr"
    assert res["main_files"] == ["x.txt"]
    assert res["pr2"] == [2, "refs/pr/2", True]
    assert res["pr2_files"] == ["pr2.txt", "x.txt"]
    assert hub.head("org/br", "main") == res["main1"]


def test_errors_are_typed(hub, env):
    hub.commit("org/err", {"a.txt": b"a"})
    res = client(r"""
    from huggingface_hub import hf_hub_download, model_info, list_repo_files
    from huggingface_hub.errors import (RepositoryNotFoundError, EntryNotFoundError,
                                        RevisionNotFoundError)
    def kind(fn, expected):
        t = time.time()
        try:
            fn()
        except expected as e:
            return [type(e).__name__, getattr(e.response, "status_code", None), round(time.time() - t, 2)]
        except Exception as e:
            return ["UNEXPECTED " + type(e).__name__ + ": " + str(e)[:300], None, None]
        return ["no error", None, None]
    out({
        "repo_download": kind(lambda: hf_hub_download("org/missing", "a.txt"), RepositoryNotFoundError),
        "repo_info": kind(lambda: model_info("org/missing"), RepositoryNotFoundError),
        "entry": kind(lambda: hf_hub_download("org/err", "missing.txt"), EntryNotFoundError),
        "rev_download": kind(lambda: hf_hub_download("org/err", "a.txt", revision="nope"), RevisionNotFoundError),
        "rev_info": kind(lambda: model_info("org/err", revision="nope"), RevisionNotFoundError),
        "rev_list": kind(lambda: list_repo_files("org/err", revision="nope"), RevisionNotFoundError),
    })
    """, env)
    assert res["repo_download"][:2] == ["RepositoryNotFoundError", 404]
    assert res["repo_info"][:2] == ["RepositoryNotFoundError", 404]
    assert res["entry"][:2] == ["RemoteEntryNotFoundError", 404]
    for k in ("rev_download", "rev_info", "rev_list"):
        assert res[k][:2] == ["RevisionNotFoundError", 404], (k, res[k])
    assert all(v[2] < 5 for v in res.values()), res  # no retries on 4xx


@pytest.mark.parametrize("token", ["hf_wrong", None], ids=["wrong-token", "no-token"])
def test_bad_token_is_a_clear_401(hub, tmp_path, token):
    hub.commit("org/locked", {"a.txt": b"a"})
    before = hub.head("org/locked")
    env = hub_env(hub, tmp_path / "hf_home")
    if token is None:
        env.pop("HF_TOKEN")
    else:
        env["HF_TOKEN"] = token
    res = client(r"""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    r = {}
    for name, fn in [
        ("upload", lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="b.txt", repo_id="org/locked")),
        ("create", lambda: api.create_repo("org/new-locked")),
        ("branch", lambda: api.create_branch("org/locked", branch="b")),
    ]:
        t = time.time()
        try:
            fn()
            r[name] = ["no error"]
        except HfHubHTTPError as e:
            r[name] = [type(e).__name__, e.response.status_code, str(e), time.time() - t]
    # reads still work without a valid token
    r["read"] = open(hf_hub_download("org/locked", "a.txt"), "rb").read().decode()
    out(r)
    """, env)
    for name in ("upload", "create", "branch"):
        kind, status, msg, elapsed = res[name]
        assert (kind, status) == ("HfHubHTTPError", 401), res[name]
        assert "Invalid credentials" in msg and elapsed < 5
    assert res["read"] == "a"
    assert hub.head("org/locked") == before
    assert "org/new-locked" not in hub.repo_ids()
    assert hub.branches("org/locked") == {"main": before}


def test_stopped_server_fails_fast(tmp_path):
    hub = LocalHub().start()
    hub.stop()
    hub.stop()  # idempotent
    res = client(r"""
    from huggingface_hub import model_info, create_repo
    r = {}
    for name, fn in [("info", lambda: model_info("org/x")), ("create", lambda: create_repo("org/x"))]:
        t = time.time()
        try:
            fn()
            r[name] = ["no error", 0]
        except Exception as e:
            r[name] = [[c.__name__ for c in type(e).__mro__], time.time() - t]
    out(r)
    """, hub_env(hub, tmp_path / "hf_home"), timeout=30)
    for name, (mro, elapsed) in res.items():
        assert "ConnectError" in mro, (name, mro)
        assert elapsed < 5, (name, elapsed)


# ---------------------------------------------------------------------------- real transformers
README = """---
license: mit
tags:
- image-classification
- prompt-sparsity-test
---

# tiny

A tiny ResNet for LocalHub tests.
"""


def test_transformers_push_to_hub_and_from_pretrained(hub, tmp_path):
    # One subprocess (importing torch + transformers costs ~5-15 s on a busy 2-core machine):
    # push_to_hub does not write the download cache, so the load below starts from an empty
    # hub cache (asserted) and every file comes from the server (asserted from its log).
    hf_home = tmp_path / "hf_home"
    res = client(rf"""
    T0 = time.time()
    import torch
    from transformers import (AutoModelForImageClassification, ResNetConfig,
                              ResNetForImageClassification)
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.constants import HF_HUB_CACHE
    t_import = time.time() - T0
    torch.manual_seed(0)
    cfg = ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=3)
    model = ResNetForImageClassification(cfg).eval()
    info = model.push_to_hub("org/tiny")
    readme_default = "README.md" in HfApi().list_repo_files("org/tiny")
    card_commit = HfApi().upload_file(path_or_fileobj={README!r}.encode(), path_in_repo="README.md",
                                      repo_id="org/tiny")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).logits
    del model

    # push_to_hub only left refs / a ".no_exist" marker (README.md was missing) in the cache
    blobs = os.path.join(HF_HUB_CACHE, "models--org--tiny", "blobs")
    cache_before = sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []
    t_push = time.time() - T0
    loaded = AutoModelForImageClassification.from_pretrained("org/tiny")
    with torch.no_grad():
        logits = loaded(x).logits
    card = ModelCard.load("org/tiny")
    out({{"times": [t_import, t_push, time.time() - T0], "commit": info.oid, "card_commit": card_commit.oid, "readme_default": readme_default,
         "cache_before": cache_before, "cache_dir": HF_HUB_CACHE,
         "cls": type(loaded).__name__, "equal": bool(torch.equal(logits, expected)),
         "max_diff": float((logits - expected).abs().max()),
         "license": card.data.license, "tags": card.data.tags, "text": card.text.strip()}})
    """, hub_env(hub, hf_home), timeout=240)
    assert res["cache_dir"].startswith(str(hf_home)) and res["cache_before"] == []
    assert res["readme_default"]  # push_to_hub wrote a default card (HEAD README.md -> 404 first)
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.list_files("org/tiny"))
    assert hub.commits("org/tiny")[:2] == [res["card_commit"], res["commit"]]
    assert res["cls"] == "ResNetForImageClassification"
    assert res["equal"], res["max_diff"]
    assert res["license"] == "mit" and "prompt-sparsity-test" in res["tags"]
    assert res["text"].startswith("# tiny")
    print("import / push / total seconds:", res["times"])
    downloaded = hub.downloaded_files("org/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(downloaded), downloaded
