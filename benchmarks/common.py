"""Shared pieces of the benchmark scripts: command line, machine/threads/versions header, the fixed data set, runs
at equal budgets in passes over the data, mean +- std aggregation, atomic result files, markdown tables and plots.

Every script writes `<output-dir>/<name>.json` (all numbers plus the environment), `<name>.png` and `<name>.md`
(the tables, each with the machine, threads, image size, epochs and seeds beside it) and prints the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Everything the benchmarks need is offline (built-in model and data); never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from prompt_sparsity.training import write_json_atomic  # noqa: E402

# One colour per method across every plot; the prompt methods (VPNs, PASS) in red, no baseline shares it.
COLOURS = {"vpns": "C3", "pass": "C3", "hydra": "C0", "omp": "C1", "random": "C2", "snip": "C4", "synflow": "C5",
           "grasp": "C6", "imp": "C7", "bip": "C8", "l1": "C0", "taylor": "C1", "bn_scale": "C2", "random_channels": "C4", "depgraph": "C5",
           "dense": "k"}
DISPLAY = {"vpns": "VPNs", "hydra": "HYDRA", "omp": "OMP", "random": "Random", "snip": "SNIP", "grasp": "GraSP",
           "synflow": "SynFlow", "imp": "IMP", "bip": "BiP", "dense": "Dense fine-tuned", "pass": "PASS", "l1": "L1-norm", "taylor": "Taylor",
           "bn_scale": "BN-scale", "random_channels": "Random channels", "depgraph": "DepGraph",
           "scaled": "paper's scaled"}


# --------------------------------------------------------------------------------------------- command line
def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The options every script shares: --quick, --output-dir, --work-dir, --threads, --fresh."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=(doc or "").strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke-size run (<= 5 min on 2 CPU cores)")
    p.add_argument("--output-dir", default=None,
                   help="where <name>.json/.png/.md go (default: benchmarks/results, or benchmarks/results/quick "
                        "with --quick)")
    p.add_argument("--work-dir", default=None,
                   help=f"run folders and the fixed data set (default: outputs/benchmarks/{name}[-quick]; finished "
                        "runs found there with the same settings are reused)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in --work-dir and run again")
    return p


def setup(args, name: str) -> tuple[Path, Path]:
    """Threads, and the output and work folders (created)."""
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir) if args.output_dir else BENCH_DIR / "results" / ("quick" if args.quick else "")
    default_work = ROOT / "outputs" / "benchmarks" / (name + ("-quick" if args.quick else ""))
    work = Path(args.work_dir) if args.work_dir else default_work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return out, work


# --------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - an optional package
        return None


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def environment(args) -> dict[str, Any]:
    """What the numbers were measured on: machine, cores, threads, device, versions, commit, command."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",  # every benchmark here runs on the CPU (latency is a CPU measurement by design)
        "gpu_present": gpu,
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "torchvision", "transformers", "timm", "accelerate",
                                                "datasets", "torch_pruning", "safetensors")},
        "git_commit": _git_commit(),
        "mode": "quick" if args.quick else "full",
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
    }


def machine_line(env: dict[str, Any]) -> str:
    """One line: CPU, cores, threads, device, torch version, mode."""
    return (f"{env['cpu']}, {env['cores_available']} cores available, {env['torch_threads']} torch threads, "
            f"{env['device'].upper()} (torch {env['versions']['torch']}), {env['mode']} mode, "
            f"load average at start {env['load_average_at_start']}, commit {env['git_commit']}, {env['date_utc']}")


def settings_block(env: dict[str, Any], **settings) -> str:
    """The line printed beside every table: machine + the settings that produced it."""
    parts = [f"**Machine:** {machine_line(env)}."]
    parts += [f"**{k.replace('_', ' ').capitalize()}:** {v}." for k, v in settings.items() if v is not None]
    return "  \n".join(parts)


# --------------------------------------------------------------------------------------------- numbers
def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n-1; 0 for one value) of the values that are not None."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals), "values": vals}


def fmt_ms(agg: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    """'85.12 ± 0.34' (the ± only when there are several values), '–' when there is none."""
    if not agg or agg.get("mean") is None:
        return "–"
    m = agg["mean"] * scale
    if agg["n"] > 1:
        return f"{m:.{digits}f} ± {agg['std'] * scale:.{digits}f}"
    return f"{m:.{digits}f}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def human_count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median and min wall time (ms) of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


# --------------------------------------------------------------------------------------------- tables, files
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one letter per column (l/r/c), default: first left, rest right."""
    align = align or ("l" + "r" * (len(headers) - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it 0600) and rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _publish(tmp, path)


def save_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    _publish(tmp, path)


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def finish(name: str, out_dir: Path, results: dict[str, Any], markdown: str, fig, started: float) -> None:
    """Write <name>.json (with the script's wall time), <name>.png and <name>.md; print the markdown."""
    wall = time.perf_counter() - started
    results["script_wall_time_s"] = round(wall, 1)
    if hasattr(os, "getloadavg"):
        results["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    mode = results["environment"]["mode"]
    markdown = (markdown.rstrip() + f"\n\nScript wall time: {wall / 60:.1f} min ({mode} mode; "
                f"load average at the end {results['environment'].get('load_average_at_end')}: above the number of "
                "cores means other processes shared the CPU and every time here is inflated).\n")
    write_json_atomic(str(out_dir / f"{name}.json"), results)
    save_figure(fig, out_dir / f"{name}.png")
    write_text_atomic(out_dir / f"{name}.md", markdown)
    print("\n" + markdown, flush=True)
    print(f"wrote {out_dir / name}.json, .png, .md", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- data
def fixed_dataset(work_dir: Path, *, train: int, validation: int, test: int | None, seed: int = 0,
                  source: str = "fashion_mnist") -> str:
    """A fixed Fashion-MNIST subset saved to disk once (class-balanced train subset, validation held out of the
    official train split, `test` images of the official test split or all 10,000 with None), so that every method
    and every seed sees exactly the same images: the run seed then only changes initialisation, shuffling and
    augmentation. Returns the folder, to be passed as `dataset_name`."""
    from prompt_sparsity.data import load_image_dataset

    tag = f"{source}-train{train}-val{validation}-test{test or 'all'}-seed{seed}"
    path = work_dir.parent / "data" / tag
    if not (path / "dataset_dict.json").is_file():
        import datasets

        data = load_image_dataset(source, seed=seed, validation_fraction=0.1, max_train_samples=train,
                                  max_eval_samples=None)

        def subset(split, n):  # class-balanced, seeded
            if n is None or n >= len(split):
                return split
            return split.train_test_split(test_size=n, stratify_by_column="label", seed=seed)["test"]

        val, test_split = subset(data.validation, validation), subset(data.test, test)
        tmp = path.with_name(path.name + ".tmp")
        # The splits decode images on access (a format transform, which save_to_disk cannot store): saved undecoded.
        splits = {"train": data.train, "validation": val, "test": test_split}
        datasets.DatasetDict({k: v.with_format(None) for k, v in splits.items()}).save_to_disk(str(tmp))
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------------------------- runs
# The tuning recipes every method can be run with (`methods.with_tuning`): its own (the paper's), and the shared
# recipe (two-step tuning: half the batches un-augmented at test scale) without and with the visual prompt.
TUNINGS = {"paper": {}, "two_step": {"finetune_steps": "two", "prompt_method": "none"},
           "two_step_prompt": {"finetune_steps": "two", "prompt_method": "pad"}}
TUNING_DISPLAY = {"paper": "own (paper) recipe", "two_step": "two-step tuning, no prompt",
                  "two_step_prompt": "two-step tuning + prompt"}


def split_method(spec: str) -> tuple[str, str | None]:
    """'vpns:snip' -> ('vpns', 'snip'): a benchmark method with a score init other than the default."""
    name, _, init = spec.partition(":")
    return name, (init or None)


def method_label(spec: str) -> str:
    name, init = split_method(spec)
    return DISPLAY.get(name, name) + (f" ({DISPLAY.get(init, init)} init)" if init else "")


def tuned_method(method_name: str, tuning: str = "paper"):
    """The registered method with the benchmark tuning recipe applied (`methods.with_tuning`)."""
    from prompt_sparsity.methods import get_method, with_tuning

    return with_tuning(get_method(split_method(method_name)[0]), **TUNINGS[tuning])


def canonical_tuning(method_name: str, tuning: str) -> str:
    """'paper' when the recipe is the method's own (VPNs' own recipe is two-step + prompt), so runs are shared."""
    return "paper" if tuned_method(method_name, tuning) is tuned_method(method_name) else tuning


def stage_passes(method_name: str, steps: str | None = None, tuning: str = "paper") -> list[tuple[str, int]]:
    """[(epochs field, passes over the training set per epoch)] for each training stage of a method: a two-step
    (prompted + augmented) epoch is two passes (VPNS.md §7), and so is a BiP (bilevel) epoch, whose iterations take
    one batch for the weight step and one for the score step. IMP's rounds (`Rounds`) count as one stage: they share
    their epochs field."""
    from prompt_sparsity.methods import Rounds, Stage

    method = tuned_method(method_name, tuning)
    out = []
    for stage in method.plan:
        if isinstance(stage, (Stage, Rounds)):
            s = stage.steps or steps or method.steps
            out.append((stage.epochs_field, 2 if s == "two" else 1))
    return out


def equal_budget_epochs(method_name: str, passes: int, search_share: float | None = None,
                        tuning: str = "paper", tuning_passes: int | None = None) -> dict[str, int]:
    """Epochs per stage so that the method makes `passes` passes over the training data in all, split equally
    between its stages (VPNs 30 + 30 two-pass epochs = HYDRA 60 + 60 = 120 passes; OMP dense + fine-tune; one-shot
    pruners put everything into fine-tuning). `search_share` gives a search stage (VPNs, HYDRA, PASS) that fraction
    of the passes instead, the rest to the other stage (an ablation of how a search method spends its budget).
    `tuning_passes` gives the tuning stage (the last) that many passes whatever the other stages get, so every
    final mask is tuned alike (equal tuning, not equal total budget: a search then costs passes on top)."""
    stages = stage_passes(method_name, tuning=tuning)
    searching = [f for f, _ in stages if f == "search_epochs"]
    epochs = {}
    for i, (field, per_epoch) in enumerate(stages):
        share = passes / len(stages)
        if search_share is not None and searching and len(stages) == 2:
            share = passes * (search_share if field == "search_epochs" else 1 - search_share)
        if tuning_passes is not None and i == len(stages) - 1:
            share = tuning_passes
        e = share / per_epoch
        if e != int(e) or e < 1:
            raise ValueError(f"{method_name}: {passes} passes do not split into whole epochs over its stages "
                             f"{stages}; use a multiple of {2 * len(stages) * max(p for _, p in stages)}.")
        epochs[field] = int(e)
    return epochs


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run_once(output_dir: Path, model_args, data_args, prune_args, run_args, *, fresh: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """`run_pruning` into `output_dir`, or the results already there when they were made with the same arguments.
    A failure is recorded as {"error": ...} instead of ending the benchmark."""
    from prompt_sparsity.training import run_pruning

    # A run is repeated only when its settings changed (or --fresh): replacing the old folder is then wanted.
    run_args = dataclasses.replace(run_args, output_dir=str(output_dir), overwrite_output_dir=True)
    wanted = {}
    for group in (model_args, data_args, prune_args, run_args):
        wanted.update(dataclasses.asdict(group))
    wanted = _jsonable(wanted)
    path = output_dir / "results.json"
    if not fresh and path.is_file():
        with open(path) as f:
            old = json.load(f)
        # A setting added to the library after the run counts as its default (an old run is still that run).
        defaults = {}
        for group in (model_args, data_args, prune_args, run_args):
            defaults.update(_jsonable({f.name: f.default for f in dataclasses.fields(group)
                                       if f.default is not dataclasses.MISSING}))
        old_args = {**{k: v for k, v in wanted.items() if k not in (old.get("args") or {}) and defaults.get(k, object())
                       == v}, **(old.get("args") or {})}
        if old_args == wanted:
            log(f"  reusing {path}")
            old["reused"] = True
            return old
    t0 = time.perf_counter()
    try:
        results = run_pruning(model_args, data_args, prune_args, run_args)
    except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
        traceback.print_exc()
        log(f"  FAILED after {time.perf_counter() - t0:.0f} s: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "method": prune_args.method}
    log(f"  done in {time.perf_counter() - t0:.0f} s")
    return results


def test_accuracy(results: dict[str, Any], prompt: bool) -> float | None:
    test = (results.get("accuracy") or {}).get("test") or {}
    return test.get("test_accuracy_prompt" if prompt else "test_accuracy_no_prompt")


def val_accuracy(results: dict[str, Any], prompt: bool) -> float | None:
    val = (results.get("accuracy") or {}).get("validation") or {}
    return val.get("validation_accuracy_prompt" if prompt else "validation_accuracy_no_prompt")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def accuracy_run_args(*, dataset: str, input_size: int, batch_size: int, method: str, seed: int, passes: int,
                      threads: int, workers: int = 1, lr_scale: float = 1.0, train: int | None = None,
                      dense_reference: bool = True, search_share: float | None = None, tuning: str = "paper",
                      tuning_passes: int | None = None, **prune_kwargs):
    """The four argument groups of one accuracy run: library defaults (lr, optimisers, prompt, FLM head) except
    the data (the fixed on-disk subset, used whole), the image size, the equal pass budget, the tuning recipe
    (`TUNINGS`) and no checkpoints; `lr_scale` multiplies every learning rate ('auto' ones once resolved).
    `method` may carry a score init ('vpns:snip')."""
    from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments

    spec, (method, init) = method, split_method(method)
    recipe = dict(TUNINGS[tuning])
    model = ModelArguments(model_name_or_path="efficientnet-lite0", input_size=input_size,
                           prompt_method=recipe.pop("prompt_method", None))
    data = DataArguments(dataset_name=dataset, max_train_samples=None, max_eval_samples=None,
                         per_device_train_batch_size=batch_size, per_device_eval_batch_size=128,
                         dataloader_num_workers=workers)
    if lr_scale != 1.0:
        prune_kwargs = {**prune_kwargs, "lr_scale": lr_scale}
    if init:
        prune_kwargs = {**prune_kwargs, "score_init": init}
    prune = PruningArguments(method=method, **equal_budget_epochs(spec, passes, search_share, tuning, tuning_passes), **recipe,
                             **prune_kwargs)
    run = RunArguments(seed=seed, checkpointing=False, torch_threads=threads, cpu=True,
                       dense_reference=dense_reference)
    return model, data, prune, run


# --------------------------------------------------------------------------------------------- lr selection
LR_FIELDS = ("score_lr", "search_prompt_lr", "hypernet_lr", "structure_prompt_lr", "finetune_lr",
             "finetune_prompt_lr")


def headline_val(results: dict[str, Any]) -> float | None:
    """Validation accuracy of the model as it runs by default (prompted when it has a prompt)."""
    v = val_accuracy(results, True)
    return v if v is not None else val_accuracy(results, False)


def run_lr_selected(jobs: Sequence[dict[str, Any]], work_dir: Path, make_args: Callable[..., tuple], *,
                    scales: Sequence[float], fresh: bool = False, no_grid: Sequence[str] = ("dense",)):
    """The fair protocol: for each (method, level), every learning-rate scale runs at the first seed; the scale
    with the best validation accuracy (ties: the one closest to 1) is selected on validation only, and the other
    seeds run at it. Returns (all runs, selection {"method@level": {"scales": {scale: val}, "selected": s}}).
    `make_args(method, level, seed, lr_scale)`."""
    seeds = list(dict.fromkeys(j["seed"] for j in jobs))
    # One selection per configuration: the job's keys but the seed (method, level and e.g. the tuning recipe).
    configs = list(dict.fromkeys(tuple((k, v) for k, v in j.items() if k != "seed") for j in jobs))

    def key(cfg) -> str:
        return "@".join(str(v) for _, v in cfg)

    def of(run) -> str:
        return key(tuple((k, v) for k, v in run["job"].items() if k not in ("seed", "lr_scale")))

    first = [{**dict(c), "seed": seeds[0], "lr_scale": sc}
             for c in configs for sc in (scales if dict(c)["method"] not in no_grid else (1.0,))]
    runs = run_grid(first, work_dir, make_args, fresh=fresh)
    selection = {}
    for c in configs:
        tried = {r["job"]["lr_scale"]: headline_val(r) for r in runs if of(r) == key(c) and "error" not in r}
        ok = {sc: v for sc, v in tried.items() if v is not None}
        best = max(ok, key=lambda sc: (ok[sc], -abs(math.log(sc)))) if ok else 1.0
        selection[key(c)] = {**dict(c), "scales": tried, "selected": best}
    rest = [{**dict(c), "seed": seed, "lr_scale": selection[key(c)]["selected"]} for c in configs for seed in seeds[1:]]
    runs += run_grid(rest, work_dir, make_args, fresh=fresh)
    for r in runs:
        r["selected"] = r["job"]["lr_scale"] == selection[of(r)]["selected"]
    return runs, selection


def lr_selection_text(selection: dict, display: dict) -> list[str]:
    """One line per method and level: validation accuracy at each scale, the selected one in bold."""
    lines = []
    for sel in selection.values():
        parts = []
        for sc, v in sorted(sel["scales"].items()):
            cell = f"{sc:g}x: {'–' if v is None else f'{v:.1f}'}"
            parts.append(f"**{cell}**" if sc == sel["selected"] else cell)
        tuning = f", {TUNING_DISPLAY[sel['tuning']]}" if "tuning" in sel else ""
        lines.append(f"{display.get(sel['method']) or method_label(sel['method'])} @ {sel['level']:g}"
                     f"{tuning}: " + ", ".join(parts))
    return lines


def run_grid(jobs: Sequence[dict[str, Any]], work_dir: Path, make_args: Callable[..., tuple], *,
             fresh: bool = False) -> list[dict[str, Any]]:
    """Run every job ({"method", "level", "seed", ...}) one after the other in this process; each job's results
    dict gets the job's keys under "job" and its run folder under "run_dir"."""
    out = []
    t0 = time.perf_counter()
    for i, job in enumerate(jobs):
        folder = work_dir / "runs" / "-".join(f"{v}" for v in job.values()).replace(".", "p")
        progress(f"run {i + 1}/{len(jobs)}: {job}  (elapsed {(time.perf_counter() - t0) / 60:.1f} min)")
        results = run_once(folder, *make_args(**job), fresh=fresh, log=progress)
        results["job"] = dict(job)
        results["run_dir"] = str(folder)
        out.append(results)
    return out


def accuracy_results(name: str, env: dict[str, Any], cfg: dict, dataset: str, rows: list, findings: list,
                     runs: Sequence[dict[str, Any]], **extra) -> dict[str, Any]:
    """The JSON an accuracy benchmark writes: settings, summary rows, findings and each run's compact summary."""
    return {"benchmark": name, "environment": env,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "dataset_dir": dataset, "summary": rows, **extra, "findings": findings,
            "reused_runs": sum(1 for r in runs if r.get("reused")),
            "runs": [compact_summary(r) for r in runs]}


def compact_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The fields of a run's results.json that the benchmark JSON keeps (not the per-layer details)."""
    keep = ("name", "method", "sparsity_target", "sparsity", "pruned_weights", "prunable_weights", "accuracy",
            "dense_pretrained_flm", "epochs", "history", "timings_s", "wall_time_s", "train_images_per_s", "samples",
            "input_size", "prompt_method", "steps", "torch_threads", "device", "seed", "flops", "dense_flops",
            "flops_ratio", "flops_target", "params", "dense_params", "channel_widths", "latency", "error", "job",
            "run_dir", "latency_224", "reused", "selected", "learning_rates", "label_mapping_source")
    return {k: results[k] for k in keep if k in results}


def epochs_text(methods: Sequence[str], passes: int, search_share: float | None = None,
                tuning: str = "paper", tuning_passes: int | None = None) -> str:
    """'VPNs search 2 + finetune 2; HYDRA search 4 + finetune 4; ...' for the settings line."""
    parts = []
    for m in dict.fromkeys(split_method(m)[0] for m in methods):
        stages = " + ".join(f"{field.split('_')[0]} {e}"
                            for field, e in equal_budget_epochs(m, passes, search_share, tuning,
                                                                tuning_passes).items())
        parts.append(f"{DISPLAY.get(m, m)} {stages}")
    return "; ".join(parts)


def reuse_note(runs: Sequence[dict[str, Any]]) -> str:
    """A sentence for the markdown when some runs came from an earlier invocation (their times are theirs)."""
    n = sum(1 for r in runs if r.get("reused"))
    if not n:
        return f"All {len(runs)} runs were made by this invocation."
    return (f"{n} of {len(runs)} runs were reused from an earlier invocation with the same settings (their wall times "
            "are from that invocation; the script wall time below does not include them).")


def accuracy_arguments(name: str, doc: str, methods_help: str, level: str, level_help: str, argv=None):
    """The command line shared by the two accuracy benchmarks (`level` is "sparsities" or "flops")."""
    p = parser(name, doc)
    p.add_argument("--methods", nargs="+", default=None, help=methods_help)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument(f"--{level}", nargs="+", type=float, default=None, help=level_help)
    p.add_argument("--passes", type=int, default=None, help="passes over the training data per method (mult. of 4)")
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--test-samples", type=int, default=None,
                   help="a fixed class-balanced subset of N test images; 0 = all 10,000 (the full mode's default)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense fine-tuned reference")
    p.add_argument("--tunings", nargs="+", default=None, choices=tuple(TUNINGS),
                   help="tuning recipes every method runs with: paper (its own), two_step (shared, no prompt), "
                        "two_step_prompt (shared, with the prompt); full mode: all three")
    p.add_argument("--search-share", type=float, default=None,
                   help="ablation: the fraction of the passes a search method (VPNs, HYDRA, PASS) spends searching "
                        "(default: an equal split between its stages)")
    p.add_argument("--tuning-passes", type=int, default=None,
                   help="equal tuning instead of equal total budget: every method's tuning stage gets this many "
                        "passes; mask-finding stages keep their share of --passes on top (default: equal total)")
    p.add_argument("--lr-scales", nargs="+", type=float, default=None,
                   help="the learning-rate grid every method gets, as multiples of its defaults (full mode: 0.3 1 "
                        "3); the best on validation at the first seed is used for the other seeds")
    p.add_argument("--prune-arg", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a PruningArguments field for every run (repeatable), e.g. score_lr=1e-3 for an "
                        "ablation; use with --output-dir and --work-dir so the default results stay apart")
    return p.parse_args(argv)


GRID_FIELDS = ("method", "sparsity", "flops_ratio")


def prune_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """{"score_lr": 0.001} from ["score_lr=1e-3"], each value converted to the field's default's type."""
    from prompt_sparsity.arguments import PruningArguments

    fields = {f.name: f for f in dataclasses.fields(PruningArguments)}
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--prune-arg {pair!r}: expected FIELD=VALUE with FIELD one of PruningArguments' fields "
                             f"({', '.join(sorted(fields))}).")
        if name in GRID_FIELDS or name.endswith("_epochs"):
            raise SystemExit(f"--prune-arg {pair!r}: the benchmark sets {name} itself (use --methods, --passes, "
                             "--sparsities / --flops).")
        default = fields[name].default
        kind = type(default) if default is not None and default is not dataclasses.MISSING else str
        if "list" in str(fields[name].type):  # e.g. exclude_modules=classifier,conv_head
            out[name] = [v for v in value.split(",") if v]
        elif kind is bool:
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[name] = kind(value)
            except ValueError:
                raise SystemExit(f"--prune-arg {pair!r}: {value!r} is not a {kind.__name__}.") from None
    return out


def overrides_text(cfg: dict) -> str:
    """'; overrides: score_lr=0.001' for the budget line, or '' when the library defaults were used."""
    o = cfg.get("overrides") or {}
    return "; overrides: " + ", ".join(f"{k}={v}" for k, v in o.items()) if o else ""


def accuracy_config(args, quick: dict, full: dict, level: str) -> dict:
    """The mode's settings with the command-line overrides applied."""
    cfg = dict(quick if args.quick else full)
    for key in ("methods", "seeds", level, "passes", "lr_scales", "tunings"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(getattr(args, key)) if key != "passes" else getattr(args, key)
    if args.train_samples:
        cfg["train"] = args.train_samples
    if args.test_samples is not None:
        cfg["test"] = args.test_samples or None
    cfg["overrides"] = prune_overrides(args.prune_arg)
    cfg["search_share"] = args.search_share
    cfg["tuning_passes"] = args.tuning_passes
    return cfg
