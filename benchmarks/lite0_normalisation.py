"""Which input normalisation (and layer settings) do the offline EfficientNet-Lite0 weights expect?

Measured, not guessed, four ways, for each candidate normalisation x layer variant:

1. weights   -- read the answer off the weights: the stem BatchNorm's running mean/var are
                what the stem conv produced on the (normalised) training images.  Its running
                mean is linear in the mean input (least squares over 32 channels gives the mean
                of the normalised training input per RGB channel) and its running var, with a
                pixel-correlation structure taken from natural photos and ImageNet's pixel std,
                gives the std of the normalised training input.  Each candidate predicts these
                numbers: (ImageNet mean - mean) / std and ImageNet std / std.
2. BN fit    -- label-free: on random crops of natural photos, how far each BatchNorm layer's
                batch statistics are from its running statistics (mean |z| of the channel
                means, mean |log var ratio|), averaged over all 49 BatchNorms.  Lower is better.
3. photos    -- top-1 on the sample photos (scikit-learn's china.jpg / flower.jpg and
                matplotlib's grace_hopper.jpg) and the probability of the expected classes.
4. probe     -- logistic-regression and kNN probes on pooled 1280-d features of Fashion-MNIST
                (train split -> t10k split).

Layer variants (same tensors; only padding / BN eps differ):
``timm``     = ``efficientnet_lite0`` as timm builds it (symmetric padding, BN eps 1e-5);
``eps1e-3``  = BN eps 1e-3 (TensorFlow's);
``tf-same``  = TF "SAME" padding + BN eps 1e-3 (= timm's ``tf_efficientnet_lite0`` layers).

Run (about 6-8 minutes on one busy CPU thread):

    PYTHONPATH=. .venv/bin/python benchmarks/lite0_normalisation.py

It prints the tables and writes them to ``benchmarks/results/lite0_normalisation.md``.
"""

from __future__ import annotations

import argparse
import gzip
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_sparsity.pretrained import (  # noqa: E402
    BUILTIN_MODELS,
    _imagenet_label_names,
    efficientnet_lite0_checkpoint_path,
    load_efficientnet_lite0_state_dict,
    load_efficientnet_lite0_timm,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALISATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "0.5/0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "127/128": ((127 / 255,) * 3, (128 / 255,) * 3),  # TF-Lite's (x - 127) / 128 on 0..255
    "none [0,1]": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

VARIANTS = {
    "timm": {},
    "eps1e-3": {"bn_eps": 1e-3},
    "tf-same": {"pad_type": "same", "bn_eps": 1e-3},
}

# The probe is the slowest measurement (~0.1 s per image on one thread here); it is run for the
# plain timm layers and the TF layers only.
PROBE_VARIANTS = ("timm", "tf-same")

# Candidates shown but not chosen on their own: numerically the same as another one.
ALIASES = {"127/128": "0.5/0.5"}

INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

# Expected ImageNet classes per photo (class-name prefixes as timm spells them).
EXPECTED = {
    "china.jpg": ("bell cote", "boathouse", "palace", "monastery", "church"),
    "flower.jpg": ("daisy",),
    "grace_hopper.jpg": ("military uniform",),
}

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def load_photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    photos = {Path(name).name: Image.fromarray(array) for name, array in zip(data.filenames, data.images)}
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            photos["grace_hopper.jpg"] = Image.open(hopper).convert("RGB")
    except ImportError:
        pass
    return photos


def eval_crop(image: Image.Image, interpolation, size: int = 224, crop_pct: float = 0.875) -> np.ndarray:
    """timm's eval transform: resize the short side to size / crop_pct, centre-crop size."""
    scale_size = math.floor(size / crop_pct)
    w, h = image.size
    if w <= h:
        new = (scale_size, int(scale_size * h / w))
    else:
        new = (int(scale_size * w / h), scale_size)
    image = image.resize(new, interpolation)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def random_crops(photos, count: int, interpolation, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Random-resized crops (scale 0.25-1 of the area, aspect 3/4-4/3) of the photos, uint8 NHWC."""
    crops = []
    images = list(photos.values())
    for i in range(count):
        image = images[i % len(images)]
        w, h = image.size
        for _ in range(20):
            area = w * h * rng.uniform(0.25, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if cw <= w and ch <= h:
                break
        else:
            cw, ch = min(w, h), min(w, h)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = image.crop((x, y, x + cw, y + ch)).resize((size, size), interpolation)
        crops.append(np.asarray(crop, dtype=np.uint8))
    return np.stack(crops)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte
        raise ValueError(f"{path}: unsupported IDX type {magic:#x}")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_subset(split: str, per_class: int, rng: np.random.Generator):
    images = read_idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz")
    index = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(FASHION_CLASSES)]
    )
    return images[index], labels[index].astype(np.int64)


def upsample_gray(images: np.ndarray, interpolation, size: int = 224) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), interpolation)) for im in images])


def to_tensor(batch_uint8: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 NHWC (or NHW gray) -> normalised float NCHW."""
    x = torch.from_numpy(batch_uint8).float().div_(255.0)
    x = x.unsqueeze(-1).expand(*x.shape, 3) if x.ndim == 3 else x
    x = x.permute(0, 3, 1, 2)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def weights_inferred_input_stats(natural_uint8: np.ndarray):
    """Mean and std of the normalised training input, read off the stem conv + BN statistics."""
    source = load_efficientnet_lite0_state_dict()
    keys = [k for k in source if not k.endswith("num_batches_tracked")]
    w = source[keys[0]].double()  # stem conv (32, 3, 3, 3)
    running_mean, running_var = source[keys[3]].double(), source[keys[4]].double()
    assert w.shape == (32, 3, 3, 3) and running_mean.shape == (32,), (keys[:5], w.shape)

    # running_mean[c] = sum_k (sum_ij W[c,k,i,j]) * m_k   (conv is linear; no bias)
    a = w.sum(dim=(2, 3))  # (32, 3)
    m_hat, *_ = torch.linalg.lstsq(a, running_mean.unsqueeze(1))
    m_hat = m_hat.squeeze(1)
    fit = a @ m_hat
    r2 = 1 - ((running_mean - fit) ** 2).sum() / ((running_mean - running_mean.mean()) ** 2).sum()

    # running_var[c] = w_c^T Cov w_c, Cov = covariance of the normalised 3x3x3 input patches.
    # Correlation of 3x3 RGB patches from natural photos; per-channel pixel std from ImageNet.
    x = torch.from_numpy(natural_uint8).double().div(255).permute(0, 3, 1, 2)
    patches = torch.nn.functional.unfold(x, kernel_size=3, stride=2)  # (N, 27, L); order k,i,j
    patches = patches.permute(0, 2, 1).reshape(-1, 27)
    corr = torch.corrcoef(patches.T)
    pixel_std = torch.tensor(IMAGENET_STD, dtype=torch.float64).repeat_interleave(9)
    cov_raw = corr * pixel_std[:, None] * pixel_std[None, :]  # raw [0,1] pixel scale
    flat = w.reshape(32, 27)
    var_raw = torch.einsum("ci,ij,cj->c", flat, cov_raw, flat)
    # If the training input was x_raw / s (s = the normalisation std), var = var_raw / s^2.
    s_per_channel = torch.sqrt(var_raw / running_var)
    s_hat = float(torch.median(s_per_channel))
    spread = float(torch.quantile(s_per_channel, 0.75) / torch.quantile(s_per_channel, 0.25))
    return {
        "mean_norm": m_hat.tolist(),
        "mean_r2": float(r2),
        "std_scale": s_hat,  # the normalisation std the stem statistics imply
        "std_scale_iqr_ratio": spread,
    }


class BNRecorder:
    """Hooks every BatchNorm2d; records per-channel batch mean/var of its input."""

    def __init__(self, model: torch.nn.Module):
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.nn.BatchNorm2d]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                self.handles.append(module.register_forward_hook(self._hook(name, module)))

    def _hook(self, name, module):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().double()
            self.stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)), module)

        return hook

    def scores(self):
        z_all, lv_all, first = [], [], None
        for name, (mean, var, module) in self.stats.items():
            rm, rv = module.running_mean.double(), module.running_var.double()
            z = ((mean - rm).abs() / torch.sqrt(rv + module.eps)).mean().item()
            lv = torch.log((var + module.eps) / (rv + module.eps)).abs().mean().item()
            z_all.append(z)
            lv_all.append(lv)
            if first is None:
                first = (z, lv)
        return first, (float(np.mean(z_all)), float(np.mean(lv_all)))

    def close(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def pooled_features(model, images_uint8: np.ndarray, mean, std, batch: int = 50) -> np.ndarray:
    feats = []
    for i in range(0, len(images_uint8), batch):
        x = to_tensor(images_uint8[i : i + batch], mean, std)
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(feats)


def probe_scores(train_x, train_y, test_x, test_y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tr, te = scaler.transform(train_x), scaler.transform(test_x)
    logreg = LogisticRegression(max_iter=2000, C=0.1).fit(tr, train_y)
    normed_tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    normed_te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    knn = KNeighborsClassifier(n_neighbors=5).fit(normed_tr, train_y)
    return float(logreg.score(te, test_y)), float(knn.score(normed_te, test_y))


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def expected_indices(labels: list[str]) -> dict[str, list[int]]:
    out = {}
    for photo, prefixes in EXPECTED.items():
        out[photo] = [i for i, name in enumerate(labels) if name.lower().startswith(prefixes)]
    return out


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=20, help="Fashion-MNIST images per class and split")
    parser.add_argument("--crops", type=int, default=32, help="random photo crops for the BN fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent / "results" / "lite0_normalisation.md"),
        help="markdown file to write ('' to skip)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    labels = _imagenet_label_names()
    wanted = expected_indices(labels)
    photos = {name: photos for name, photos in load_photos().items() if name in EXPECTED}
    rng = np.random.default_rng(args.seed)
    crops = {name: random_crops(photos, args.crops, interp, np.random.default_rng(args.seed)) for name, interp in INTERPOLATIONS.items()}
    photo_arrays = {name: {p: eval_crop(im, interp) for p, im in photos.items()} for name, interp in INTERPOLATIONS.items()}
    train_raw, train_y = fashion_subset("train", args.per_class, rng)
    test_raw, test_y = fashion_subset("t10k", args.per_class, rng)
    fashion = {"bicubic": (upsample_gray(train_raw, Image.BICUBIC), upsample_gray(test_raw, Image.BICUBIC))}

    emit("# EfficientNet-Lite0 (offline weights): which normalisation?")
    emit()
    emit(
        f"Checkpoint `{efficientnet_lite0_checkpoint_path().name}`; torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.machine()}; seed {args.seed}; "
        f"photos: {', '.join(photos)}; BN fit on {args.crops} random crops of them; "
        f"Fashion-MNIST probe: {args.per_class * FASHION_CLASSES} train / {args.per_class * FASHION_CLASSES} t10k images "
        "upsampled 28->224. Command: `PYTHONPATH=. .venv/bin/python benchmarks/lite0_normalisation.py`."
    )
    emit()

    # 1. the weights themselves
    inferred = weights_inferred_input_stats(crops["bicubic"])
    emit("## 1. Read off the weights (stem conv + stem BatchNorm running statistics)")
    emit()
    emit(
        f"Least squares over the 32 stem channels (R^2 = {inferred['mean_r2']:.3f}) gives the mean of the "
        "normalised training input per RGB channel; the running variances give the normalisation std "
        f"(median over channels; IQR ratio {inferred['std_scale_iqr_ratio']:.2f}), assuming ImageNet pixel std "
        "and the pixel correlations of natural photos."
    )
    emit()
    emit("| candidate | normalised ImageNet mean (R, G, B) | normalisation std | mean abs error vs measured | measured / candidate std |")
    emit("|---|---|---|---|---|")
    emit(
        "| **measured from weights** | "
        + ", ".join(f"{v:+.3f}" for v in inferred["mean_norm"])
        + f" | {inferred['std_scale']:.3f} | | |"
    )
    for name, (mean, std) in NORMALISATIONS.items():
        predicted = [(im - m) / s for im, m, s in zip(IMAGENET_MEAN, mean, std)]
        err = float(np.mean(np.abs(np.array(predicted) - np.array(inferred["mean_norm"]))))
        emit(
            f"| {name} | " + ", ".join(f"{v:+.3f}" for v in predicted)
            + f" | {np.mean(std):.3f} | {err:.3f} | {inferred['std_scale'] / np.mean(std):.2f} |"
        )
    emit()

    # 2-4. per variant x normalisation
    names = list(photo_arrays["bicubic"])
    rows = []
    for variant, model_args in VARIANTS.items():
        model = load_efficientnet_lite0_timm(model_args=model_args)
        for norm, (mean, std) in NORMALISATIONS.items():
            recorder = BNRecorder(model)
            with torch.no_grad():
                model(to_tensor(crops["bicubic"], mean, std))
            (stem_z, stem_lv), (all_z, all_lv) = recorder.scores()
            recorder.close()

            with torch.no_grad():
                probs = model(to_tensor(np.stack([photo_arrays["bicubic"][n] for n in names]), mean, std)).softmax(-1)
            photo_cells, expected_mass = [], []
            for i, name in enumerate(names):
                top = int(probs[i].argmax())
                mass = float(probs[i, wanted[name]].sum())
                expected_mass.append(mass)
                photo_cells.append(f"{labels[top].split(',')[0]} {float(probs[i, top]):.2f}")

            logreg = knn = float("nan")
            if variant in PROBE_VARIANTS:
                tr, te = fashion["bicubic"]
                logreg, knn = probe_scores(
                    pooled_features(model, tr, mean, std), train_y, pooled_features(model, te, mean, std), test_y
                )
            rows.append(
                dict(
                    variant=variant, norm=norm, stem_z=stem_z, stem_lv=stem_lv, all_z=all_z, all_lv=all_lv,
                    photos=photo_cells, mass=expected_mass, logreg=logreg, knn=knn,
                )
            )
            print(f"  [{time.perf_counter() - start:6.1f}s] {variant} / {norm} done", file=sys.stderr, flush=True)

    expected_text = "; ".join(f"{k}: {', '.join(v)}" for k, v in EXPECTED.items())
    emit("## 2-4. Layer variant x normalisation (bicubic resize, 224, crop_pct 0.875)")
    emit()
    emit(
        "BN fit: mean |z| of batch channel means vs running means, and mean |log var ratio|, on random photo "
        "crops (stem BN / average of all 49 BNs; lower = the network sees the statistics it was trained on). "
        "Photos: top-1 and its probability; 'expected p' is the probability on the expected classes "
        f"({expected_text}), averaged over the photos. "
        "Probe: Fashion-MNIST accuracy of logistic regression (C=0.1, standardised) and 5-NN (cosine) on pooled "
        f"features (variants {', '.join(PROBE_VARIANTS)} only; '-' = not run)."
    )
    emit()
    header = "| variant | normalisation | BN fit stem z / logvar | BN fit all z / logvar | " + " | ".join(names) + " | expected p | probe logreg | probe 5-NN |"
    emit(header)
    emit("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        emit(
            f"| {r['variant']} | {r['norm']} | {r['stem_z']:.2f} / {r['stem_lv']:.2f} | {r['all_z']:.3f} / {r['all_lv']:.3f} | "
            + " | ".join(r["photos"])
            + f" | {np.mean(r['mass']):.3f} | {_fmt(r['logreg'])} | {_fmt(r['knn'])} |"
        )
    emit()

    # Summary per normalisation (averaged over the layer variants).
    emit("## Summary per normalisation (averaged over layer variants)")
    emit()
    emit("| normalisation | weights: mean error | weights: std ratio | BN misfit (z + logvar) | expected p | probe logreg | probe 5-NN |")
    emit("|---|---|---|---|---|---|---|")
    for norm, (mean, std) in NORMALISATIONS.items():
        rs = [r for r in rows if r["norm"] == norm]
        predicted = [(im - m) / s for im, m, s in zip(IMAGENET_MEAN, mean, std)]
        err = float(np.mean(np.abs(np.array(predicted) - np.array(inferred["mean_norm"]))))
        probes = [r for r in rs if not math.isnan(r["logreg"])]
        emit(
            f"| {norm} | {err:.3f} | {inferred['std_scale'] / np.mean(std):.2f} | "
            f"{np.mean([r['all_z'] + r['all_lv'] for r in rs]):.3f} | {np.mean([np.mean(r['mass']) for r in rs]):.3f} | "
            f"{np.mean([r['logreg'] for r in probes]):.3f} | {np.mean([r['knn'] for r in probes]):.3f} |"
        )
    emit()

    # Decision: the label-free BN misfit (averaged over the layer variants) picks the normalisation,
    # then the layer variant; 127/128 is 0.5/0.5 to within 0.4 % and is not a separate choice.
    def misfit(r):
        return r["all_z"] + r["all_lv"]

    choices = [n for n in NORMALISATIONS if n not in ALIASES]
    by_norm = {n: np.mean([misfit(r) for r in rows if r["norm"] == n]) for n in choices}
    win_norm = min(by_norm, key=by_norm.get)
    at_norm = [r for r in rows if r["norm"] == win_norm]
    win_variant = min(at_norm, key=misfit)["variant"]
    best_mass = max(rows, key=lambda r: np.mean(r["mass"]))
    best_probe = max((r for r in rows if not math.isnan(r["logreg"])), key=lambda r: r["logreg"])
    emit(
        f"Lowest BN misfit averaged over variants: **{win_norm}**; at {win_norm}, lowest BN misfit: "
        f"**{win_variant}**. Highest expected-class probability: {best_mass['variant']} / {best_mass['norm']}; "
        f"best logreg probe: {best_probe['variant']} / {best_probe['norm']}."
    )
    emit()

    # 5. interpolation, for the winning variant and normalisation
    emit(f"## 5. Resize interpolation ({win_variant} / {win_norm})")
    emit()
    emit("| interpolation | BN fit all z / logvar | " + " | ".join(f"{n} top-3" for n in names) + " | expected p |")
    emit("|" + "---|" * (len(names) + 3))
    model = load_efficientnet_lite0_timm(model_args=VARIANTS[win_variant])
    mean, std = NORMALISATIONS[win_norm]
    for interp in INTERPOLATIONS:
        recorder = BNRecorder(model)
        with torch.no_grad():
            model(to_tensor(crops[interp], mean, std))
        _, (all_z, all_lv) = recorder.scores()
        recorder.close()
        with torch.no_grad():
            probs = model(to_tensor(np.stack([photo_arrays[interp][n] for n in names]), mean, std)).softmax(-1)
        cells, masses = [], []
        for i, name in enumerate(names):
            values, idx = probs[i].topk(3)
            cells.append(", ".join(f"{labels[j].split(',')[0]} {v:.2f}" for v, j in zip(values.tolist(), idx.tolist())))
            masses.append(float(probs[i, wanted[name]].sum()))
        emit(f"| {interp} | {all_z:.3f} / {all_lv:.3f} | " + " | ".join(cells) + f" | {np.mean(masses):.3f} |")
    emit()

    recorded = BUILTIN_MODELS["efficientnet-lite0"]
    agrees = (
        tuple(recorded["mean"]) == tuple(NORMALISATIONS[win_norm][0])
        and tuple(recorded["std"]) == tuple(NORMALISATIONS[win_norm][1])
        and dict(recorded["model_args"]) == VARIANTS[win_variant]
    )
    emit("## Recorded")
    emit()
    emit(
        f"`prompt_sparsity.pretrained.BUILTIN_MODELS['efficientnet-lite0']` (copied into the converted config's "
        f"`pretrained_cfg`): mean {tuple(recorded['mean'])}, std {tuple(recorded['std'])}, interpolation "
        f"{recorded['interpolation']}, input_size {tuple(recorded['input_size'])}, crop_pct {recorded['crop_pct']}, "
        f"model_args {recorded['model_args']}. Agrees with the measured winner: **{'yes' if agrees else 'NO'}**."
    )
    emit()
    emit(f"Total time: {time.perf_counter() - start:.0f} s.")

    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
