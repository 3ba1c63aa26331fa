"""prompt_sparsity.hub against the local Hub server (tests/hub_server.py) with the real clients.

The clients run in subprocesses (huggingface_hub reads HF_ENDPOINT at import; this session is offline), each in a
fresh HF_HOME, and several checks share one subprocess: every one imports torch + transformers (5-15 s here).
The model card itself is rendered in-process (no network).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from tiny_models import tiny_model

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.hub import render_model_card

try:
    from tests.hub_server import LocalHub, hub_env, run_client_json
except ImportError:  # only tests/ on sys.path
    from hub_server import LocalHub, hub_env, run_client_json

ROOT = Path(__file__).resolve().parents[1]
S = 32
OWN_CARD = "---\nlicense: mit\ntags:\n- hand-written\n---\n\n# A card written by a person\n"


class RecordingHub(LocalHub):
    """LocalHub that also records (method, path, Range header, status, body length) of every answered request."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.transfers: list[tuple[str, str, str | None, int, int]] = []

    def _route(self, method, segs, query, headers, body):
        resp = super()._route(method, segs, query, headers, body)
        self.transfers.append((method, "/" + "/".join(segs), headers.get("Range"), resp.status, resp.length))
        return resp


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_subnetwork(seed: int) -> PromptedSparseModel:
    torch.manual_seed(seed)
    model = PromptedSparseModel.from_base(tiny_model("resnet_basic", seed=seed), sparsity=0.9, input_size=S,
                                          output_size=S, pad_size=4)
    with torch.no_grad():
        model.sparsity.scores.uniform_(-1, 1)  # a mask unlike the magnitude one
        for p in model.prompt.parameters():
            p.uniform_(-0.5, 0.5)  # a prompt that changes the logits
    model.set_label_mapping([7, 2, 5], {0: "cat", 1: "dog", 2: "bird"})
    model.freeze_mask()
    return model.eval()


def results_for(name: str, sparsity: float) -> dict:
    return {
        "name": name, "method": "vpns", "model": "microsoft/resnet-18", "dataset": "uoft-cs/cifar100",
        "num_labels": 3, "samples": {"train": 30, "validation": 6, "test": 12}, "prompt_method": "pad",
        "input_size": S, "sparsity_target": 0.9, "sparsity": sparsity, "pruned_weights": 9, "prunable_weights": 10,
        "accuracy": {
            "validation": {"validation_accuracy_prompt": 50.0, "validation_top5_accuracy_prompt": 100.0,
                           "validation_accuracy_no_prompt": 33.3, "validation_top5_accuracy_no_prompt": 100.0},
            "test": {"test_accuracy_prompt": 58.33, "test_top5_accuracy_prompt": 100.0,
                     "test_accuracy_no_prompt": 41.67, "test_top5_accuracy_no_prompt": 100.0},
        },
        "dense_pretrained_flm": {"accuracy": 25.0, "top5_accuracy": 100.0},
        "wall_time_s": 12.5, "world_size": 1, "device": "cpu", "seed": 0,
        "mask_sha256": "not-a-{{ placeholder }}-{0}",  # braces in values must pass through verbatim
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two saved VPNs-style subnetworks (A with run debris, B), reference logits, and digests of the folders."""
    root = tmp_path_factory.mktemp("hub")
    pixels = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(1))
    ref = {"pixels": pixels}
    dirs = {}
    for key, seed in (("a", 0), ("b", 1)):
        model = make_subnetwork(seed)
        path = root / f"run_{key}"
        model.save_pretrained(path)
        (path / "results.json").write_text(json.dumps(results_for(f"vpns-tiny-{key}", model.sparsity_report()["global"])))
        with torch.no_grad():
            ref[f"logits_{key}"] = model(pixels).logits
            ref[f"logits_{key}_no_prompt"] = model(pixels, use_prompt=False).logits
        dirs[key] = path
    (dirs["a"] / "checkpoints" / "stage0-epoch0").mkdir(parents=True)
    (dirs["a"] / "checkpoints" / "stage0-epoch0" / "optimizer.bin").write_bytes(b"debris" * 100)
    (dirs["a"] / "train.log").write_text("debris\n")
    assert not torch.equal(ref["logits_a"], ref["logits_b"])
    save_file({k: v.contiguous() for k, v in ref.items()}, root / "ref.safetensors")
    return {"a": dirs["a"], "b": dirs["b"], "ref": root / "ref.safetensors",
            "digest_a": tree_digest(dirs["a"]), "digest_b": tree_digest(dirs["b"])}


@pytest.fixture(scope="module")
def hub():
    with RecordingHub() as h:
        yield h
    assert not h.errors, "server-side errors:\n" + "\n".join(h.errors)


def client(code: str, hub, hf_home: Path, saved, timeout: float = 240):
    env = hub_env(hub, hf_home, T_A=str(saved["a"]), T_B=str(saved["b"]), T_REF=str(saved["ref"]))
    return run_client_json(code, env, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ model card
def test_model_card_fields_and_fallbacks(saved, tmp_path):
    text = render_model_card(saved["a"], "org/vpns-tiny")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "prompt-sparsity" and data["pipeline_tag"] == "image-classification"
    assert data["base_model"] == "microsoft/resnet-18" and data["datasets"] == ["uoft-cs/cifar100"]
    assert {"prompt-sparsity", "pruning", "vpns", "unstructured", "image-classification"} <= set(data["tags"])
    metrics = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics["Top-1 accuracy (%) with prompt"] == 58.33
    assert metrics["Top-1 accuracy (%) without prompt"] == 41.67
    assert metrics["Weight sparsity (%)"] == pytest.approx(90.0, abs=0.1)
    assert data["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    assert "| dense pretrained + FLM (no training, no prompt) | 0% | 25.00 |" in text
    assert "| VPNs, with prompt | 90.0% | 58.33 |" in text
    assert 'PromptedSparseModel.from_pretrained("org/vpns-tiny")' in text
    assert 'pipeline("image-classification", model="org/vpns-tiny")' in text
    assert "not faster than the dense one" in text
    assert "`not-a-{{ placeholder }}-{0}`" in text  # verbatim, single-pass substitution

    # Without results.json, and with a local base path: sparsity from the config, no base_model, no model-index.
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((saved["a"] / "config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path)
    (bare / "config.json").write_text(json.dumps(config))
    card = ModelCard(render_model_card(bare))
    data = card.data.to_dict()
    assert "base_model" not in data and "model-index" not in data and data["library_name"] == "prompt-sparsity"
    assert "| this subnetwork | 90.0% |" in card.text and "<user>/bare" in card.text

    # A structured (PASS) result: FLOPs ratio in the model-index, FLOPs / params / latency in the body.
    pas = tmp_path / "pass"
    pas.mkdir()
    config.update(sparsity_type="structured", base_model_name_or_path="efficientnet-lite0", flops_ratio=0.5,
                  channel_widths={"unit": 4})
    (pas / "config.json").write_text(json.dumps(config))
    res = results_for("pass", 0.0)
    res.update(method="pass", flops=2.0e6, dense_flops=4.0e6, flops_ratio=0.497, flops_target=0.5, params=1000,
               dense_params=2000, latency={"device": "cpu", "threads": 1, "warmup": 3, "repeats": 15,
                                           "batch_1": {"dense": {"median_ms": 4.0}, "compact": {"median_ms": 2.5},
                                                       "speedup": 1.6}})
    (pas / "results.json").write_text(json.dumps(res))
    text = render_model_card(pas, "org/pass")
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and data["license"] == "apache-2.0"  # built-in base: its license, no Hub link
    assert "structured" in data["tags"] and "pass" in data["tags"]
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics["flops_ratio"] == 0.497 and "sparsity" not in metrics
    assert "| PASS, with prompt | 0.497 | 2.00M | 1.00k | 58.33 |" in text, text
    assert "| cpu | 1 | 1 | 4.00 | 2.50 | 1.60× |" in text
    assert "physically removed" in text


def test_card_never_shows_a_local_base_path_and_states_the_bases_license(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    config = json.loads((saved["a"] / "config.json").read_text())

    def card(base, base_config=None, name="card"):
        out = tmp_path / name
        out.mkdir()
        c = {**config, "base_model_name_or_path": base}
        if base_config is not None:
            c["base_config"] = {**c["base_config"], **base_config}
        (out / "config.json").write_text(json.dumps(c))
        (out / "results.json").write_text(json.dumps({**results_for("vpns", 0.9), "model": base}))
        text = render_model_card(out)
        return text, ModelCard(text).data.to_dict()

    # A local folder with a card of its own: the license it states; neither the path nor its parents in the card.
    base = tmp_path / "private-projects" / "my-base"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: mit\n---\n\n# my base\n")
    text, data = card(str(base), name="local")
    assert "private-projects" not in text and str(tmp_path) not in text
    assert "a local model `my-base` (" in text and "- Base model: a local model `my-base`" in text
    assert data["license"] == "mit" and "base_model" not in data

    # A snapshot in the HF cache: the Hub id it is a copy of, and the license of its cached card (offline).
    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--resnet-x"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "README.md").write_text("---\nlicense: bsd-3-clause\n---\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    text, data = card(str(snapshot), name="cached")
    assert "hub-cache" not in text and str(tmp_path) not in text
    assert data["base_model"] == "org/resnet-x" and data["license"] == "bsd-3-clause"
    assert "[`org/resnet-x`](https://huggingface.co/org/resnet-x)" in text
    _, data = card("org/resnet-x", name="hub")  # a Hub id whose card is cached
    assert data["base_model"] == "org/resnet-x" and data["license"] == "bsd-3-clause"

    # Stated by nothing here: no license (never guessed); timm's pretrained_cfg states one.
    bare = tmp_path / "elsewhere" / "plain-base"
    bare.mkdir(parents=True)
    text, data = card(str(bare), name="nothing")
    assert "license" not in data and "elsewhere" not in text
    _, data = card("org/not-cached", name="uncached")
    assert "license" not in data and data["base_model"] == "org/not-cached"
    _, data = card(str(bare), {"pretrained_cfg": {"license": "apache-2.0"}}, name="timm")
    assert data["license"] == "apache-2.0"


# ------------------------------------------------------------------------------------------------ push + pull
def test_push_and_pull_by_repo_id(hub, saved, tmp_path):
    hub.commit("org/carded", {"README.md": OWN_CARD})
    pushed = client(r"""
    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.hub import HubPushError, push_subnetwork
    A, B = os.environ["T_A"], os.environ["T_B"]
    r = {}
    r["main"] = push_subnetwork(A, "org/vpns-tiny").oid
    r["dev"] = push_subnetwork(B, "org/vpns-tiny", revision="dev").oid
    r["kept"] = push_subnetwork(A, "org/carded").oid
    r["overwritten"] = push_subnetwork(A, "org/carded", overwrite_card=True, commit_message="new card").oid
    r["private"] = push_subnetwork(B, "org/private", private=True)
    t = time.time()
    try:
        push_subnetwork(A, "org/vpns-tiny", token="hf_wrong")
        r["bad_token"] = None
    except HubPushError as e:
        r["bad_token"] = [str(e), e.repo_id, type(e.__cause__).__name__, time.time() - t]
    model = PromptedSparseModel.from_pretrained(A)
    r["push_to_hub"] = model.push_to_hub("org/x", results=json.load(open(os.path.join(A, "results.json"))))
    out(r)
    """, hub, tmp_path / "push_home", saved)

    # What went up: exactly the subnetwork files + a card; checkpoints/ and logs stayed local.
    files = hub.files("org/vpns-tiny")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "modeling_prompted_sparse.py",
                             "preprocessor_config.json", "results.json"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "results.json"):
        assert files[name] == (saved["a"] / name).read_bytes(), name
    assert hub.head("org/vpns-tiny") == pushed["main"]
    assert hub.head("org/vpns-tiny", "dev") == pushed["dev"]
    assert hub.read_file("org/vpns-tiny", "model.safetensors", "dev") == (saved["b"] / "model.safetensors").read_bytes()
    assert hub.read_file("org/carded", "README.md", pushed["kept"]).decode() == OWN_CARD  # not overwritten
    new_card = hub.read_file("org/carded", "README.md", pushed["overwritten"]).decode()
    assert new_card != OWN_CARD and "library_name: prompt-sparsity" in new_card
    assert hub._get_repo("org/private").private and pushed["private"].startswith(f"{hub.endpoint}/org/private/commit/")
    # A bad token: a clear error, nothing committed, the local folders byte-identical.
    message, repo_id, cause, elapsed = pushed["bad_token"]
    assert repo_id == "org/vpns-tiny" and cause == "HfHubHTTPError" and elapsed < 10
    assert "'org/vpns-tiny'" in message and "401" in message and "token" in message
    assert f"The local output at {saved['a']} is intact" in message
    assert hub.head("org/vpns-tiny") == pushed["main"]
    assert tree_digest(saved["a"]) == saved["digest_a"] and tree_digest(saved["b"]) == saved["digest_b"]
    # model.push_to_hub: the same files, the card and the results given.
    assert sorted(hub.list_files("org/x")) == sorted(files)
    assert pushed["push_to_hub"].startswith(f"{hub.endpoint}/org/x/commit/")
    assert "VPNs, with prompt" in hub.read_file("org/x", "README.md").decode()

    hub.transfers.clear()
    pulled = client(r"""
    import torch, numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from huggingface_hub import ModelCard
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from transformers import pipeline
    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.hub import download_subnetwork, download_tensors
    A, ref = os.environ["T_A"], load_file(os.environ["T_REF"])
    stored = load_file(os.path.join(A, "model.safetensors"))
    r = {"cache_empty": not os.path.exists(HF_HUB_CACHE) or not os.listdir(HF_HUB_CACHE)}
    x = ref["pixels"]
    with torch.no_grad():
        m = PromptedSparseModel.from_pretrained("org/vpns-tiny").eval()
        r["main"] = [torch.equal(m(x).logits, ref["logits_a"]),
                     torch.equal(m(x, use_prompt=False).logits, ref["logits_a_no_prompt"])]
        state = m.state_dict()
        r["restored"] = sorted(k for k in stored if torch.equal(state[k], stored[k]))
        r["stored"] = sorted(stored)
        r["mask_prompt"] = [torch.equal(m.sparsity.mask_packed, stored["sparsity.mask_packed"]),
                            all(torch.equal(p, stored["prompt." + n]) for n, p in m.prompt.named_parameters())]
        r["dev"] = torch.equal(PromptedSparseModel.from_pretrained("org/vpns-tiny", revision="dev")(x).logits,
                               ref["logits_b"])
        r["sha"] = torch.equal(PromptedSparseModel.from_pretrained("org/vpns-tiny", revision=os.environ["T_SHA"])(x).logits,
                               ref["logits_a"])
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    r["pipeline"] = sorted(p["label"] for p in pipeline("image-classification", model="org/vpns-tiny")(image))
    card = ModelCard.load("org/vpns-tiny")
    r["card"] = card.data.to_dict()
    r["meta_only"] = sorted(os.listdir(download_subnetwork("org/private", include_weights=False)))  # a fresh snapshot
    r["full"] = sorted(os.listdir(download_subnetwork("org/carded")))
    r["local"] = download_subnetwork(A) == A
    tensors = download_tensors("org/x", ["sparsity.mask_packed", "prompt.*"])
    r["tensors"] = sorted(tensors)
    r["tensors_equal"] = all(torch.equal(v, stored[k]) and v.dtype == stored[k].dtype for k, v in tensors.items())
    r["size"] = os.path.getsize(os.path.join(A, "model.safetensors"))
    def err(fn):
        t = time.time()
        try:
            fn()
        except Exception as e:
            return [type(e).__name__, str(e), time.time() - t]
    r["missing_repo"] = err(lambda: download_subnetwork("org/does-not-exist"))
    r["missing_repo_tensors"] = err(lambda: download_tensors("org/does-not-exist", "sparsity.mask_packed"))
    r["missing_rev"] = err(lambda: download_subnetwork("org/vpns-tiny", revision="nope"))
    r["missing_tensor"] = err(lambda: download_tensors("org/x", "sparsity.nothing"))
    out(r)
    """.replace('os.environ["T_SHA"]', repr(pushed["main"])), hub, tmp_path / "pull_home", saved)

    assert pulled["cache_empty"]
    assert pulled["main"] == [True, True], "logits differ after a pull by repo id"
    assert pulled["restored"] == pulled["stored"]  # every stored tensor (weights, mask, prompt) restored exactly
    assert pulled["mask_prompt"] == [True, True]
    assert pulled["dev"] and pulled["sha"]
    assert pulled["pipeline"] == ["bird", "cat", "dog"]
    card = pulled["card"]
    assert card["library_name"] == "prompt-sparsity" and card["pipeline_tag"] == "image-classification"
    assert card["base_model"] == "microsoft/resnet-18" and "vpns" in card["tags"] and card["model-index"]
    assert pulled["meta_only"] == ["config.json", "preprocessor_config.json", "results.json"]
    assert pulled["full"] == ["config.json", "model.safetensors", "preprocessor_config.json", "results.json"]
    assert pulled["local"]
    assert pulled["tensors"] == ["prompt.pad_down", "prompt.pad_left", "prompt.pad_right", "prompt.pad_up",
                                 "sparsity.mask_packed"]
    assert pulled["tensors_equal"]
    # download_tensors: only range requests on org/x's model.safetensors, pinned to one commit, a fraction of it.
    gets = [t for t in hub.transfers if t[0] == "GET" and t[1].startswith("/org/x/resolve/")
            and t[1].endswith("/model.safetensors")]
    assert gets and all(t[2] and t[3] == 206 for t in gets), gets
    assert {t[1] for t in gets} == {f"/org/x/resolve/{hub.head('org/x')}/model.safetensors"}
    fetched = sum(t[4] for t in gets)
    assert fetched < pulled["size"] / 4, (fetched, pulled["size"])
    for key, kind in (("missing_repo", "RepositoryNotFoundError"), ("missing_repo_tensors", "RepositoryNotFoundError"),
                      ("missing_rev", "RevisionNotFoundError"), ("missing_tensor", "KeyError")):
        name, message, elapsed = pulled[key]
        assert name == kind and elapsed < 10, pulled[key]
    assert "'org/does-not-exist' was not found" in pulled["missing_repo"][1]
    assert "private" in pulled["missing_repo"][1] and "misspelt" in pulled["missing_repo"][1]
    assert "no revision 'nope'" in pulled["missing_rev"][1]
    assert "sparsity.nothing" in pulled["missing_tensor"][1]


def test_push_with_server_down_keeps_local_output(saved, tmp_path):
    down = LocalHub().start()
    down.stop()
    res = client(r"""
    from prompt_sparsity.hub import HubPushError, push_subnetwork
    t = time.time()
    try:
        push_subnetwork(os.environ["T_A"], "org/vpns-tiny")
        out(None)
    except HubPushError as e:
        out([str(e), type(e.__cause__).__name__, isinstance(e, RuntimeError), time.time() - t])
    """, down, tmp_path / "home", saved, timeout=120)
    assert res is not None, "push to a stopped server did not fail"
    message, cause, is_runtime, elapsed = res
    assert is_runtime and cause == "ConnectError" and elapsed < 10
    assert "'org/vpns-tiny'" in message and "could not reach the Hub" in message and down.endpoint in message
    assert f"The local output at {saved['a']} is intact" in message
    assert tree_digest(saved["a"]) == saved["digest_a"]



def test_standard_push_options_and_save_pretrained_push(hub, saved, tmp_path):
    """push_to_hub takes the transformers keywords; save_pretrained(push_to_hub=True) pushes the image processor and
    the card too, so `pipeline(repo)` works on what it pushed."""
    res = client(r"""
    import tempfile
    import numpy as np
    from PIL import Image
    from transformers import pipeline
    from prompt_sparsity import PromptedSparseModel
    model = PromptedSparseModel.from_pretrained(os.environ["T_A"])
    r = {}
    r["first"] = model.push_to_hub("org/std", commit_message="first upload", commit_description="why: a test",
                                   private=True, token=os.environ["HF_TOKEN"], tags=["my-tag"],
                                   max_shard_size="1GB").oid
    pr = model.push_to_hub("org/std", create_pr=True, commit_message="as a PR", overwrite_card=True)
    r["pr_url"], r["pr_oid"] = pr.pr_url, pr.oid
    r["dev"] = model.push_to_hub("org/std", revision="dev", commit_message="to a branch").oid
    folder = os.path.join(tempfile.mkdtemp(), "saved-and-pushed")
    model.save_pretrained(folder, push_to_hub=True, repo_id="org/saved", commit_message="saved and pushed")
    r["local"] = sorted(os.listdir(folder))
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    r["pipeline"] = sorted(p["label"] for p in pipeline("image-classification", model="org/saved")(image))
    out(r)
    """, hub, tmp_path / "home", saved)
    repo = hub._get_repo("org/std")
    assert repo.private
    first = repo.commits[res["first"]]
    assert (first.title, first.message) == ("first upload", "why: a test")
    card = hub.read_file("org/std", "README.md", res["first"]).decode()
    assert "my-tag" in ModelCard(card).data.tags and 'from_pretrained("org/std")' in card
    assert res["pr_url"].endswith("/discussions/1") and hub.head("org/std") == res["first"]  # main untouched
    assert repo.refs["refs/pr/1"] == res["pr_oid"]
    assert hub.head("org/std", "dev") == res["dev"]
    assert res["local"] == ["README.md", "config.json", "model.safetensors", "modeling_prompted_sparse.py",
                            "preprocessor_config.json"]
    pushed = sorted(hub.list_files("org/saved"))
    assert pushed == ["README.md", "config.json", "model.safetensors", "modeling_prompted_sparse.py",
                      "preprocessor_config.json"]
    assert 'from_pretrained("org/saved")' in hub.read_file("org/saved", "README.md").decode()
    assert res["pipeline"] == ["bird", "cat", "dog"]
