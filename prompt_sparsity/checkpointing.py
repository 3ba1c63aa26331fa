"""Checkpoints and output folders that lose nothing and load nothing unsafe.

- A training checkpoint is our own format, not `accelerator.save_state`: accelerate reloads registered custom
  objects with `torch.load(weights_only=False)` (a crafted `custom_checkpoint_0.pkl` runs code) and its RNG and
  optimizer files are pickles whose safety depends on its version. Ours: `model.safetensors`, `optimizer.pt`
  (tensors and numbers only, read with `weights_only=True`), `rng_state_<rank>.json` and `trainer_state.json`
  (the run state, the LR scheduler state and the run's settings). Nothing else in a checkpoint folder is read.
- Every checkpoint records the settings that define the run's result (`run_settings`); resuming refuses a
  checkpoint of other settings with the list of differences, and `latest` picks only checkpoints of this run.
- Every file of a checkpoint is checked before anything is resumed (`checkpoint_problems`); a missing or damaged one
  is named with the intact checkpoints beside it, and `latest` refuses a damaged checkpoint rather than skip it.
- A new run refuses a folder that holds a finished run or an unfinished one (`check_output_dir`).
- Checkpoints and the final output are written in a staging folder and renamed into place, so a crash never leaves
  a folder that mixes two runs' files (`write_checkpoint_atomically`, `publish_output`).
- `check_launch` turns launches that accelerate does not carry out as asked into a clear error: `accelerate launch
  --cpu --num_processes 2` (one process), `--multi_gpu` without GPUs (independent single-process runs), FSDP asked
  for but not active. `check_shared_output_dir` refuses an output folder the processes do not all see (machines
  with their own disks), before training rather than at the first checkpoint.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state_{rank}.json"
CHECKPOINT_FORMAT = 2  # 1 = accelerate's save_state with a pickled scheduler (never loaded)

# RunArguments/DataArguments/PruningArguments fields that change how a run is carried out or where it is written,
# not what it computes; every other field (also ones added later) is a setting a checkpoint must match.
NOT_SETTINGS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "checkpointing", "report_to", "torch_threads",
    "cpu", "push_to_hub", "hub_model_id", "hub_private", "dataloader_num_workers", "per_device_eval_batch_size",
    "latency_batch_sizes", "with_tracking", "checkpointing_steps", "cache_dir",
})
# Settings that name a file or folder: compared as real paths, so `./base` and `/abs/base` are the same run.
_PATH_SETTINGS = ("model_name_or_path", "dataset_name", "subnetwork")

# Files of a final output (save_pretrained + results.json) that a new one replaces.
_OUTPUT_FILE = re.compile(r"^(config\.json|results\.json|preprocessor_config\.json|generation_config\.json|"
                          r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|"
                          r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?)$")
# What makes a folder a loadable model or a claimed result: moved out first, moved in last.
_DEFINING_FILES = ("config.json", "results.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (another run's settings, an old or damaged format)."""


class OutputDirError(ValueError):
    """An output folder a new run would overwrite or mix with."""


# --------------------------------------------------------------------------------------------------- files
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON next to `path` and rename it into place: a crash never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions of an ordinary one
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------- settings
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_settings(args: Mapping[str, Any], *, world_size: int) -> dict[str, Any]:
    """The settings that define a run's result: every argument except the operational ones in `NOT_SETTINGS`,
    local paths made absolute, plus the number of processes (it changes the global batch and the RNG streams)."""
    out = {}
    for key, value in args.items():
        if key in NOT_SETTINGS:
            continue
        if key in _PATH_SETTINGS and isinstance(value, str) and os.path.exists(value):
            value = os.path.realpath(value)
        out[key] = _jsonable(value)
    out["world_size"] = int(world_size)
    return out


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                         defaults: Mapping[str, Any] | None = None) -> list[str]:
    """`name: checkpoint X, now Y` for each setting that differs. A setting the checkpoint does not record (it
    was added to the library later) counts as its default, so old checkpoints of default runs still resume."""
    defaults = defaults or {}
    missing = object()
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        old = recorded.get(key, _jsonable(defaults[key]) if key in defaults else missing)
        new = current.get(key, missing)
        if old != new:
            show = lambda v: "(not recorded)" if v is missing else json.dumps(v)  # noqa: E731
            diffs.append(f"{key}: checkpoint {show(old)}, now {show(new)}")
    return diffs


# --------------------------------------------------------------------------------------------------- RNG
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain JSON: the same set accelerate saves, no pickle."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _parse_rng_state(state: Mapping[str, Any]) -> tuple:
    version, py_state, gauss = state["python"]
    python = (int(version), tuple(int(x) for x in py_state), None if gauss is None else float(gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy = (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    return python, numpy, _unb64(state["torch"]), [_unb64(s) for s in state.get("cuda", [])]


def set_rng_state(state: Mapping[str, Any]) -> None:
    python, numpy, cpu, cuda = _parse_rng_state(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_state_problem(state: Any) -> str | None:
    """Why `state` cannot be restored by `set_rng_state`, or None: it is applied to fresh generators, so a damaged
    file is found before anything is resumed and the process's own generators are untouched."""
    try:
        python, numpy, cpu, cuda = _parse_rng_state(state)
        random.Random().setstate(python)
        np.random.RandomState().set_state(numpy)
        torch.Generator().set_state(cpu)
        if cuda and any(s.numel() != cuda[0].numel() for s in cuda):
            return "CUDA generator states of different sizes"
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # binascii.Error is a ValueError
        return f"not a random generator state ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


# --------------------------------------------------------------------------------------------------- checkpoints
def write_checkpoint_atomically(accelerator, path: str, write_shared: Callable[[str], None],
                                write_per_process: Callable[[str], None], state: dict[str, Any]) -> None:
    """Write a checkpoint into `.partial-<name>` beside it (the main process its shared files, every process its
    own) and, once all have written, `trainer_state.json` last and a rename into place: a crash leaves the old
    checkpoint or the new one, never a mix, and a half-written one is never resumed (its name starts with '.')."""
    parent, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(parent, f".partial-{name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash: never resumed, rewritten now
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    write_per_process(staging)
    if accelerator.is_main_process:
        write_shared(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for entry in os.listdir(staging):
            _fsync(os.path.join(staging, entry))
        write_json_atomic(os.path.join(staging, STATE_FILE), state)
        _fsync(staging)
        replaced = None
        if os.path.exists(path):  # the same epoch again (after a resume or an overwrite): swap, then drop the old
            replaced = os.path.join(parent, f".replaced-{name}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(path, replaced)
        os.replace(staging, path)
        _fsync(parent)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_training_checkpoint(accelerator, path: str, *, model, optimizer, scheduler, state: dict[str, Any],
                             settings: dict[str, Any]) -> None:
    """The training state at the end of an epoch: model (safetensors), optimizer (`torch.save` of tensors and
    numbers), every process's RNG (JSON), and the run state + scheduler + settings (`trainer_state.json`)."""
    from safetensors.torch import save_model

    unwrapped = accelerator.unwrap_model(model)

    def shared(staging: str) -> None:
        save_model(unwrapped, os.path.join(staging, MODEL_FILE), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), os.path.join(staging, OPTIMIZER_FILE))

    def per_process(staging: str) -> None:
        with open(os.path.join(staging, RNG_FILE.format(rank=accelerator.process_index)), "w") as f:
            json.dump(rng_state(), f)

    meta = {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "scheduler": scheduler.state_dict(),
        "accelerator_step": int(accelerator.step),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    write_checkpoint_atomically(accelerator, path, shared, per_process, {**state, "checkpoint": meta})


def _is_legacy_state(state: Any) -> bool:
    """A run state written by an older prompt_sparsity (format 1: accelerate's save_state, no run settings)."""
    meta = state.get("checkpoint") if isinstance(state, dict) else None
    return (isinstance(state, dict) and "stage" in state and "epoch" in state
            and (not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT))


def _state_problem(state: Any) -> str | None:
    """Why a parsed `trainer_state.json` of this format cannot be resumed, or None."""
    if not isinstance(state, dict):
        return f"not a run state (a JSON {type(state).__name__}, not an object)"
    meta = state.get("checkpoint")
    if not isinstance(meta, dict):
        return "not a run state (no 'checkpoint' record)"
    expected = {"stage": int, "epoch": int, "history": list, "timings": dict}
    expected_meta = {"settings": dict, "scheduler": dict, "accelerator_step": int}
    for where, record, types in (("", state, expected), ("checkpoint.", meta, expected_meta)):
        for key, kind in types.items():
            if key not in record:
                return f"'{where}{key}' is missing"
            if not isinstance(record[key], kind) or isinstance(record[key], bool):
                return f"'{where}{key}' is a {type(record[key]).__name__}, not a {kind.__name__}"
    return None


def _checkpoint_files_present(path: str) -> bool:
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return bool(names & {STATE_FILE, MODEL_FILE, OPTIMIZER_FILE}) or any(re.fullmatch(r"rng_state_\d+\.json", n)
                                                                        for n in names)


def checkpoint_problems(path: str) -> list[tuple[str, str]]:
    """`[(file, problem)]` for every file of a checkpoint that is missing or damaged: the layout of the weight and
    optimizer files and valid JSON (`integrity.damaged_files`), then what `trainer_state.json` and every process's
    RNG state must hold to be resumed. Empty for an intact checkpoint, and for one of an older format (which
    `read_checkpoint_state` refuses with its own message)."""
    from .integrity import damaged_files

    problems = dict(damaged_files(path))

    def note(name: str, why: str) -> None:
        problems.setdefault(os.path.join(path, name), why)

    state_file = os.path.join(path, STATE_FILE)
    state = None
    if not os.path.isfile(state_file):
        note(STATE_FILE, "missing (it is written last, so the save was interrupted or the file removed)")
    elif state_file not in problems:
        with open(state_file) as f:
            state = json.load(f)
        if _is_legacy_state(state):
            return []
        why = _state_problem(state)
        if why:
            note(STATE_FILE, why)
            state = None
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            note(name, "missing")
    # One RNG file per process of the run that wrote it (recorded), else at least the main process's.
    world_size = state["checkpoint"]["settings"].get("world_size", 1) if state else 1
    ranks = range(world_size if isinstance(world_size, int) and world_size > 0 else 1)
    for rank in ranks:
        name = RNG_FILE.format(rank=rank)
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            note(name, "missing")
        elif file not in problems:
            with open(file) as f:
                why = rng_state_problem(json.load(f))
            if why:
                note(name, why)
    return sorted(problems.items())


def refuse_damaged_checkpoint(path: str, context: str = "") -> None:
    """Refuse a checkpoint with a missing or damaged file (`checkpoint_problems`), naming each file, why, and the
    intact checkpoints beside it."""
    from .integrity import refuse_damaged_checkpoint as refuse

    try:
        refuse(path, STATE_FILE, problems=checkpoint_problems, context=context)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_checkpoint_state(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run state, checkpoint metadata) of a checkpoint folder; a legacy or damaged one is refused clearly."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} is not a checkpoint of this recipe (no {STATE_FILE}); pass a folder under "
                              f"<output_dir>/checkpoints/ or 'latest'.")
    try:
        with open(file) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is damaged: resume from an earlier "
                              "one in the same checkpoints/ folder.") from e
    meta = state.pop("checkpoint", None) if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or "settings" not in meta:
        raise CheckpointError(
            f"{path} was written by an older prompt_sparsity (accelerate's save_state, with the LR scheduler in a "
            "pickle that is never loaded) and records no run settings, so it cannot be resumed safely. Start the "
            "run again: --overwrite_output_dir, or another --output_dir.")
    return state, meta


def load_training_checkpoint(accelerator, path: str, meta: Mapping[str, Any], *, model, optimizer,
                             scheduler) -> None:
    """Restore what `save_training_checkpoint` wrote. Reads only safetensors, JSON and a `weights_only=True`
    optimizer file; any other file (a `*.pkl` of an old format or a planted one) is never opened."""
    from safetensors.torch import load_model

    ignored = sorted(f for f in os.listdir(path) if f.endswith((".pkl", ".bin", ".pickle")))
    if ignored and accelerator.is_main_process:
        logger.warning("%s: ignoring %s (pickle files are never loaded; this checkpoint format does not use them)",
                       path, ", ".join(ignored))
    # Read to CPU (safetensors refuses names like "cpu:0" that DDP on CPU reports); load_state_dict copies the
    # tensors onto the model's own device.
    load_model(accelerator.unwrap_model(model), os.path.join(path, MODEL_FILE), strict=True, device="cpu")
    file = os.path.join(path, OPTIMIZER_FILE)
    try:
        optimizer_state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for a planted pickle, others for a damaged file
        raise CheckpointError(
            f"{file} is not a plain tensor file (loading it with weights_only=True was refused: "
            f"{str(e).splitlines()[0]}). It was not written by this library or is damaged; it was not executed. "
            "Resume from another checkpoint or start again.") from e
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(dict(meta["scheduler"]))
    if meta.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(dict(meta["scaler"]))
    accelerator.step = int(meta.get("accelerator_step", 0))
    rng_file = os.path.join(path, RNG_FILE.format(rank=accelerator.process_index))
    try:
        with open(rng_file) as f:
            set_rng_state(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{rng_file}: random generator state missing or damaged ({e}); resume from another "
                              "checkpoint.") from e


def _checkpoint_order(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoints under `<output_dir>/checkpoints`, oldest first (staging folders start with '.'). A folder that
    lost its `trainer_state.json` is listed too, so that `latest` names it instead of passing over it."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if not d.startswith(".") and _checkpoint_files_present(os.path.join(root, d))]
    return [os.path.join(root, d) for d in sorted(names, key=_checkpoint_order)]


def resolve_resume_checkpoint(resume: str | None, output_dir: str, settings: Mapping[str, Any],
                              defaults: Mapping[str, Any] | None = None) -> str | None:
    """The checkpoint to resume from, checked to belong to this run. 'latest' = the newest checkpoint under
    `<output_dir>/checkpoints` whose recorded settings equal this run's; an explicit folder must match too."""
    if not resume:
        return None
    if resume != "latest":
        if _checkpoint_files_present(resume):  # otherwise read_checkpoint_state says it is no checkpoint
            refuse_damaged_checkpoint(resume)
        _, meta = read_checkpoint_state(resume)
        diffs = settings_differences(meta["settings"], settings, defaults)
        if diffs:
            raise CheckpointError(
                f"{resume} belongs to a run with other settings, so resuming it would mix two runs in one result:\n  "
                + "\n  ".join(diffs)
                + "\nResume with the checkpoint's settings, or start a new run (another --output_dir, or "
                "--overwrite_output_dir without --resume_from_checkpoint).")
        return resume
    root = os.path.join(output_dir, "checkpoints")
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint in {root}.")
    reasons = []
    for path in reversed(found):
        # A damaged checkpoint is refused, not skipped: an older one would silently redo finished epochs, and
        # which run a damaged state belongs to cannot be told.
        refuse_damaged_checkpoint(path, context="--resume_from_checkpoint latest takes the newest checkpoint and "
                                                "does not skip a damaged one: ")
        try:
            _, meta = read_checkpoint_state(path)
        except CheckpointError as e:
            reasons.append(f"{os.path.basename(path)}: {e}")
            continue
        diffs = settings_differences(meta["settings"], settings, defaults)
        if not diffs:
            if reasons:
                logger.warning("--resume_from_checkpoint latest: skipped newer checkpoints of other runs: %s",
                               "; ".join(reasons))
            return path
        reasons.append(f"{os.path.basename(path)}: other settings ({'; '.join(diffs)})")
    raise CheckpointError(
        f"--resume_from_checkpoint latest: no checkpoint in {root} belongs to this run:\n  " + "\n  ".join(reasons)
        + "\nResume with that run's settings, or start this run elsewhere (another --output_dir, or "
        "--overwrite_output_dir without --resume_from_checkpoint).")


# --------------------------------------------------------------------------------------------------- output folder
def finished_output_files(output_dir: str) -> list[str]:
    """The files of a saved result or model in `output_dir` (what a new final save would replace)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(f for f in os.listdir(output_dir)
                  if _OUTPUT_FILE.match(f) and os.path.isfile(os.path.join(output_dir, f)))


def _interrupted_saves(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, d) for d in os.listdir(output_dir)
                  if d.startswith((".previous-", ".staging-")))


def check_output_dir(output_dir: str, *, overwrite: bool, resume: str | None) -> None:
    """Refuse a run into a folder whose saved work it would replace or mix with, unless `overwrite`: a finished run
    (its model/results.json) or checkpoints of an unfinished one, except when resuming from those checkpoints
    ('latest' or a folder under `<output_dir>/checkpoints`; the settings check then makes sure it is this run)."""
    if overwrite:
        return
    fixes = ("pass --overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue the run "
             "saved there, or choose another --output_dir")
    leftovers = _interrupted_saves(output_dir)
    note = (f" An earlier final save was interrupted; its files are in {', '.join(leftovers)}." if leftovers else "")
    finished = finished_output_files(output_dir)
    inside = bool(resume) and (resume == "latest" or _is_inside(resume, os.path.join(output_dir, "checkpoints")))
    if finished and not inside:
        what = ("resuming from a checkpoint of another folder would replace it" if resume
                else "a new run would replace it")
        raise OutputDirError(f"{output_dir} already holds a saved run ({', '.join(finished)}); {what}: {fixes}."
                             + note)
    if list_checkpoints(output_dir) and not inside:
        what = ("resuming from a checkpoint of another folder would add its run's checkpoints to them" if resume
                else "a new run would mix with them")
        raise OutputDirError(f"{output_dir} holds checkpoints of an unfinished run "
                             f"({os.path.join(output_dir, 'checkpoints')}); {what}: {fixes}." + note)


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def publish_output(output_dir: str, write: Callable[[str], None]) -> list[str]:
    """Run `write(staging)` into `output_dir/.staging-*`, then move its files into `output_dir`, replacing the old
    output (`_OUTPUT_FILE` names) and keeping everything else (`checkpoints/`, logs). The old files go to
    `.previous-*` first and the new ones come in with `config.json` and `results.json` last, so at every instant
    `output_dir` holds the old output, the new one, or one without config.json/results.json (not loadable, the
    rest recoverable from the dot folders): never new config beside old weights. Returns the files published."""
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=output_dir)
    try:
        write(staging)
        names = sorted(os.listdir(staging))
        for name in names:
            if not os.path.isfile(os.path.join(staging, name)):
                raise RuntimeError(f"final output {name!r} is not a plain file; publish_output moves files only")
            _fsync(os.path.join(staging, name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    defining_first = lambda n: (n not in _DEFINING_FILES, n)  # noqa: E731
    previous = tempfile.mkdtemp(prefix=".previous-", dir=output_dir)
    old = [n for n in os.listdir(output_dir)
           if os.path.isfile(os.path.join(output_dir, n)) and (n in names or _OUTPUT_FILE.match(n))]
    for name in sorted(old, key=defining_first):
        os.replace(os.path.join(output_dir, name), os.path.join(previous, name))
    _fsync(output_dir)
    for name in sorted(names, key=defining_first, reverse=True):
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    _fsync(output_dir)
    shutil.rmtree(previous, ignore_errors=True)
    os.rmdir(staging)
    return names


# --------------------------------------------------------------------------------------------------- launch
# Set by torchrun / mpirun for each process of a real multi-process launch.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _requested_processes(cmdline: Sequence[str] | None) -> int | None:
    """`--num_processes N` from the `accelerate launch` command line (the parent process), when it is there."""
    if not cmdline:
        return None
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            value = (cmdline[i + 1] if arg == flag and i + 1 < len(cmdline)
                     else arg[len(flag) + 1:] if arg.startswith(flag + "=") else None)
            if value is not None and value.isdigit():
                return int(value)
    return None


def _parent_cmdline() -> list[str] | None:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def lost_processes_message(num_processes: int, environ: Mapping[str, str] | None = None,
                           parent_cmdline: Sequence[str] | None = None) -> str | None:
    """Why this process is alone although `accelerate launch` was asked for several, or None.

    accelerate's simple launcher (used for `--cpu`, for a config whose distributed_type is NO or MULTI_CPU
    without MPI, and for `--num_processes 2` on a machine without GPUs) starts ONE process; it still exports
    ACCELERATE_* and, only when more than one process or machine was asked for, MASTER_ADDR/MASTER_PORT, but no
    WORLD_SIZE. torchrun (`--multi_gpu`) and mpirun set a world size for every process they start."""
    env = os.environ if environ is None else environ
    launched = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    if num_processes > 1 or not launched or "MASTER_PORT" not in env:
        return None
    if any(env.get(v) for v in _WORLD_SIZE_VARS):
        return None
    requested = _requested_processes(parent_cmdline if parent_cmdline is not None else _parent_cmdline())
    if requested is not None and requested <= 1:
        return None  # MASTER_PORT came from elsewhere (several machines, or the user's environment)
    n = requested or 2
    asked = f"{requested} processes" if requested else "several processes (MASTER_PORT is set)"
    return (f"`accelerate launch` was asked for {asked} but started only this one: its simple launcher (used for "
            "--cpu, or a config with distributed_type NO/MULTI_CPU without MPI) runs a single process. For "
            f"{n} CPU processes run `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {n} "
            "recipes/<recipe>.py ... --cpu` (DDP over gloo; --cpu goes after the recipe, as a recipe flag); on GPUs, "
            f"`accelerate launch --multi_gpu --num_processes {n}` with {n} GPUs; for one process, drop --num_processes.")


def ignored_world_message(num_processes: int, environ: Mapping[str, str] | None = None,
                          distributed_type: Any = None) -> str | None:
    """Why this process runs alone although its launcher started several, or None.

    torchrun (`accelerate launch --multi_gpu`) and mpirun set a world size in every process they start; accelerate
    uses it only for a distributed type it can set up. `--multi_gpu` on a machine without a GPU (and without --cpu)
    gives N processes that each see `num_processes == 1`: N independent "main" runs writing the same output_dir."""
    env = os.environ if environ is None else environ
    if num_processes > 1:
        return None
    for var in (*_WORLD_SIZE_VARS, "LOCAL_WORLD_SIZE"):
        value = str(env.get(var, "")).strip()
        if value.isdigit() and int(value) > 1:
            kind = f" ({getattr(distributed_type, 'value', distributed_type)})" if distributed_type else ""
            return (f"the launcher started {value} processes ({var}={value}) but accelerate runs this one alone"
                    f"{kind}, so they would be {value} independent runs writing one output_dir. On a machine without "
                    f"a GPU add --cpu after the recipe (or set ACCELERATE_USE_CPU=true) for DDP over gloo: "
                    f"`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {value} "
                    f"recipes/<recipe>.py ... --cpu`; with GPUs check that torch sees them "
                    f"(torch.cuda.is_available()); for one process drop --multi_gpu/--num_processes.")
    return None


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in ("1", "true", "yes", "y", "on")  # accelerate's str_to_bool


def inactive_fsdp_message(distributed_type: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """Why FSDP, asked for, is not what runs, or None. `accelerate launch --use_fsdp` (or an FSDP config) only sets
    ACCELERATE_USE_FSDP; accelerate switches to FSDP on GPUs (and the like) only, else it silently runs DDP or a
    single process with a full copy of the model per process."""
    env = os.environ if environ is None else environ
    if distributed_type is None or not _env_flag(env, "ACCELERATE_USE_FSDP"):
        return None
    kind = str(getattr(distributed_type, "value", distributed_type))
    if kind == "FSDP":
        return None
    return (f"FSDP was asked for (ACCELERATE_USE_FSDP={env.get('ACCELERATE_USE_FSDP')}, set by `accelerate launch "
            f"--use_fsdp` or an FSDP config) but accelerate runs {kind}, not FSDP: it shards only across GPUs, never "
            "on CPU or in one process. Fix: launch on 2 or more GPUs, or drop --use_fsdp (distributed_type "
            "MULTI_GPU/MULTI_CPU in the accelerate config; on CPU: `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu --num_processes N recipes/<recipe>.py ... --cpu`).")


def check_launch(num_processes: int, environ: Mapping[str, str] | None = None,
                 parent_cmdline: Sequence[str] | None = None, *, distributed_type: Any = None) -> None:
    """Raise if accelerate does not run the launch as asked: one process instead of the several asked for,
    several independent single-process runs (a world size accelerate ignores), or FSDP asked for but not active
    (`distributed_type` is the accelerator's)."""
    message = (lost_processes_message(num_processes, environ, parent_cmdline)
               or ignored_world_message(num_processes, environ, distributed_type)
               or inactive_fsdp_message(distributed_type, environ))
    if message:
        from .cli import UserError  # a RuntimeError the recipes print on one line

        raise UserError(message)


SHARED_MARKER = ".shared-storage-check-{token}"


def check_shared_output_dir(accelerator, output_dir: str) -> None:
    """Raise, on every process, unless every process sees the files the main process writes in `output_dir`.

    Checkpoints and the final save are written once, by the main process, and read (resume) by all of them; on
    machines with their own disks the other ranks would fail at the first checkpoint (FileNotFoundError) or resume
    from something else. So the main process writes a marker with a fresh token, each process looks for it, and
    all stop before training if one cannot see it."""
    if accelerator.num_processes <= 1:
        return
    import socket
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)  # every process looks for the main process's marker, not one of its own
    path = os.path.join(output_dir, SHARED_MARKER.format(token=token[0]))
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(token[0])
            f.flush()
            os.fsync(f.fileno())
    accelerator.wait_for_everyone()
    try:
        with open(path) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    views = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()  # all have looked before the marker goes
    if accelerator.is_main_process:
        os.unlink(path)
    blind = [f"rank {rank} on {host}" for rank, host, ok in views if not ok]
    if blind:
        from .cli import UserError

        raise UserError(
            f"--output_dir {output_dir} is not shared by all processes: {', '.join(blind)} cannot see the file the "
            "main process wrote there (machines with their own disks?), so checkpoints, resume and the final save "
            "would fail or diverge. Fix: put --output_dir on storage every machine mounts (NFS, a shared volume), "
            "or run on one machine.")
