"""A pruned model leaves the library: merged models (compact HF ResNet, HF MobileNetV2, timm; with and without the
prompt; a dense unstructured merge) save a folder that reloads with equal weights and logits in a process where
prompt_sparsity cannot be imported, works in `pipeline()`, and exports to ONNX with equal logits in onnxruntime;
subnetwork folders carry a loader stub instead of transformers' "upgrade transformers"; exports refuse models still
in search and never overwrite a file unasked."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from transformers import AutoModelForImageClassification, pipeline

from prompt_sparsity import MergedClassifier, PromptedSparseModel, export_onnx
from prompt_sparsity.export import ONNX_ATOL, ONNX_RTOL
from prompt_sparsity.sparsity.flops import measure_flops

IN, OUT = 24, 32  # images 24 px on a 32 px prompt canvas (pad prompt)
COMPACT = ["resnet_basic", "mobilenet_v2", "timm_efficientnet"]
LABELS = {0: "cat", 1: "dog", 2: "emu"}


def pixels(n=3, seed=1):
    return torch.rand(n, 3, IN, IN, generator=torch.Generator().manual_seed(seed))


def prompted(model):
    with torch.no_grad():  # a visible prompt: keeping it or not changes the logits
        for p in model.prompt.parameters():
            p.normal_(0.0, 0.3)
    model.set_label_mapping([3, 1, 7], LABELS)
    return model


def compact(arch, seed=0):
    model = PromptedSparseModel.from_base(tiny_model(arch, seed=seed), sparsity_type="structured", flops_ratio=0.5,
                                          input_size=IN, output_size=OUT, pad_size=4)
    prompted(model).compact()
    return model.eval()


def unstructured(seed=0):
    model = PromptedSparseModel.from_base(tiny_model("resnet_basic", seed=seed), sparsity=0.9, input_size=IN,
                                          output_size=OUT, pad_size=4)
    prompted(model).freeze_mask()
    return model.eval()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """{name: (folder, merged model, input it takes, logits the subnetwork gives on the same images)}."""
    root = tmp_path_factory.mktemp("merged")
    x = pixels()
    out = {}
    sources = {arch: compact(arch, i) for i, arch in enumerate(COMPACT)}
    sources["unstructured"] = unstructured()
    for name, model in sources.items():
        assert measure_flops(model.model, OUT) <= 0.55 * model.config.dense_flops if name != "unstructured" else True
        with torch.no_grad():
            with_prompt, without = model(x).logits, model(x, use_prompt=False).logits
        for keep in (False, True):
            plain = model.merge_and_unload(keep_prompt=keep)
            folder = root / f"{name}-{'prompt' if keep else 'plain'}"
            plain.save_pretrained(folder)
            out[folder.name] = (folder, plain, x if keep else model.prompt.normalize(x), with_prompt if keep else without)
        model.save_pretrained(root / f"{name}-subnetwork")
    return out


def test_merged_models_equal_the_subnetwork_and_save_what_reloading_needs(merged):
    for name, (folder, plain, x, expected) in merged.items():
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, expected, rtol=1e-5, atol=1e-5)
        files = set(os.listdir(folder))
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files, name
        config = json.load(open(folder / "config.json"))
        assert {int(k): v for k, v in config["id2label"].items()} == LABELS, name
        dense = name == "unstructured-plain"
        # A dense merge is the plain transformers class (no code to trust); the others carry their code.
        assert ("auto_map" in config) == (not dense) and ("modeling_merged.py" in files) == (not dense), name
        if dense:
            assert config["model_type"] == "resnet" and config["architectures"] == ["ResNetForImageClassification"]
        else:
            assert isinstance(plain, MergedClassifier) and config["model_type"] == "prompt_sparsity_merged"
        if name.startswith("timm"):  # the user's class names and input, not ImageNet's 1000 names at 224 px
            base = config["base_config"]
            assert base["label_names"] == ["cat", "dog", "emu"] and base["num_classes"] == 3
            assert base["pretrained_cfg"]["input_size"] == [3, IN, IN] and "num_classes" not in base["pretrained_cfg"]
            assert "***" in config["timm_pruned_spec"]  # timm's own pruned-variant spec
        processor = json.load(open(folder / "preprocessor_config.json"))
        assert processor["size"] == {"height": IN, "width": IN}
        assert processor["do_normalize"] == name.endswith("plain")  # the prompted model normalises inside


def test_merged_folders_reload_in_a_process_without_prompt_sparsity(merged, tmp_path):
    """The folders load with transformers alone (`prompt_sparsity` made unimportable, the remote-code cache in
    tmp_path): equal weights bit for bit, equal logits, the pipeline's labels; a subnetwork folder says what to
    install instead of "upgrade transformers"."""
    inputs = {name: x.clone() for name, (_, _, x, _) in merged.items()}
    save_file(inputs, tmp_path / "inputs.safetensors")
    folders = {name: str(folder) for name, (folder, _, _, _) in merged.items()}
    subnetwork = str(next(iter(merged.values()))[0].parent / "resnet_basic-subnetwork")
    script = textwrap.dedent("""
        import json, sys
        sys.modules["prompt_sparsity"] = None  # any import of it raises ImportError
        import numpy as np, torch
        from PIL import Image
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForImageClassification, pipeline
        try:
            import prompt_sparsity
            raise SystemExit("prompt_sparsity is importable")
        except ImportError:
            pass
        folders, subnetwork, tmp = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
        inputs = load_file(tmp + "/inputs.safetensors")
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
        logits, states, report = {}, {}, {}
        for name, folder in folders.items():
            model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
            with torch.no_grad():
                logits[name] = model(inputs[name]).logits
            states.update({f"{name}/{k}": v.contiguous() for k, v in model.state_dict().items()})
            top = pipeline("image-classification", model=folder, trust_remote_code=True)(image, top_k=3)
            report[name] = {"class": type(model).__name__, "labels": sorted(r["label"] for r in top)}
        for trust in (False, True):
            try:
                AutoModelForImageClassification.from_pretrained(subnetwork, trust_remote_code=trust)
                report[f"subnetwork_{trust}"] = "loaded"
            except Exception as err:
                report[f"subnetwork_{trust}"] = f"{type(err).__name__}: {err}"
        save_file(logits, tmp + "/logits.safetensors")
        save_file(states, tmp + "/states.safetensors")
        json.dump(report, open(tmp + "/report.json", "w"))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(folders), subnetwork, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    logits, states = load_file(tmp_path / "logits.safetensors"), load_file(tmp_path / "states.safetensors")
    report = json.load(open(tmp_path / "report.json"))
    for name, (_, plain, x, expected) in merged.items():
        for key, value in plain.state_dict().items():
            assert torch.equal(states[f"{name}/{key}"], value), (name, key)
        # Same weights, same graph: equal up to the last bit that CPU conv kernels may change with memory alignment.
        torch.testing.assert_close(logits[name], expected, rtol=1e-5, atol=1e-6)
        assert report[name]["labels"] == ["cat", "dog", "emu"], name
    assert report["unstructured-plain"]["class"] == "ResNetForImageClassification"
    assert report["resnet_basic-plain"]["class"] == "MergedClassifier"
    assert "contains custom code" in report["subnetwork_False"] and "upgrade" not in report["subnetwork_False"]
    assert "pip install prompt-sparsity" in report["subnetwork_True"], report["subnetwork_True"]
    assert "merge_and_unload(keep_prompt=True)" in report["subnetwork_True"]


def test_with_prompt_sparsity_imported_no_trust_remote_code_is_needed(merged):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    for name, (folder, plain, x, _) in merged.items():
        model = AutoModelForImageClassification.from_pretrained(folder)  # the registered class, no flag
        assert type(model).__name__ == type(plain).__name__, name
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=1e-5, atol=1e-6)
            # pipeline() = the saved image processor + the model: it agrees with them on a non-square photo
            probs = model(**plain.image_processor()(image, return_tensors="pt")).logits.softmax(-1)[0]
        results = pipeline("image-classification", model=str(folder))(image, top_k=3)
        assert {r["label"]: r["score"] for r in results} == pytest.approx(
            {LABELS[i]: float(p) for i, p in enumerate(probs)}, abs=1e-5), name


def test_subnetwork_folders_carry_the_loader_stub(merged):
    folder = next(iter(merged.values()))[0].parent / "mobilenet_v2-subnetwork"
    config = json.load(open(folder / "config.json"))
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_prompted_sparse.PromptedSparseModel"
    assert (folder / "modeling_prompted_sparse.py").is_file()
    # With the package installed, trust_remote_code=True also works: the stub hands over to the library.
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(model, PromptedSparseModel)


def test_merge_of_an_uncompacted_structured_model_is_refused():
    model = PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity_type="structured", flops_ratio=0.5,
                                          input_size=IN, output_size=OUT, pad_size=4)
    with pytest.raises(ValueError, match=r"not compacted yet.*model.compact\(\)"):
        model.merge_and_unload()


# ------------------------------------------------------------------------------------------------ ONNX
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (the 'export' extra)")


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch dimension
    return torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])


@pytest.mark.parametrize("name", ["resnet_basic-prompt", "mobilenet_v2-plain", "timm_efficientnet-prompt",
                                  "unstructured-plain"])
def test_onnx_export_of_merged_models_runs_in_onnxruntime_with_equal_logits(merged, name, tmp_path):
    folder, plain, x, _ = merged[name]
    report = export_onnx(plain, tmp_path / "model.onnx")
    assert report["max_abs_diff"] <= ONNX_ATOL and report["input_size"] == IN
    for batch in (1, 5):  # traced at 2: any batch size runs
        xb = torch.cat([x] * 2)[:batch]
        with torch.no_grad():
            ref = plain(xb).logits
        torch.testing.assert_close(run_onnx(tmp_path / "model.onnx", xb), ref, rtol=ONNX_RTOL, atol=ONNX_ATOL)


def test_onnx_export_of_a_subnetwork_folds_the_prompt_in(merged, tmp_path):
    folder = next(iter(merged.values()))[0].parent / "timm_efficientnet-subnetwork"
    model = PromptedSparseModel.from_pretrained(folder)
    x = pixels(4)
    with torch.no_grad():
        ref = model(x).logits
    export_onnx(folder, tmp_path / "sub.onnx")  # a saved folder works as well as the model
    torch.testing.assert_close(run_onnx(tmp_path / "sub.onnx", x), ref, rtol=ONNX_RTOL, atol=ONNX_ATOL)


def test_onnx_export_refuses_models_in_search_and_never_overwrites_unasked(merged, tmp_path):
    searching = PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity=0.9, input_size=IN,
                                              output_size=OUT, pad_size=4)
    with pytest.raises(ValueError, match=r"mask search.*freeze_mask\(\)"):
        export_onnx(searching, tmp_path / "a.onnx")
    hypernet = PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity_type="structured",
                                             flops_ratio=0.5, input_size=IN, output_size=OUT, pad_size=4)
    with pytest.raises(ValueError, match=r"hypernetwork.*model.compact\(\)"):
        export_onnx(hypernet, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    _, plain, x, _ = merged["resnet_basic-plain"]
    target = tmp_path / "b.onnx"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(plain, target)
    assert target.read_bytes() == b"mine"
    export_onnx(plain, target, overwrite=True)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(target, x), plain(x).logits, rtol=ONNX_RTOL, atol=ONNX_ATOL)
    assert sorted(os.listdir(tmp_path)) == ["b.onnx"]  # no temporary file left behind
