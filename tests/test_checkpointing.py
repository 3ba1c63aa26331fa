"""Lose nothing, load nothing unsafe: checkpoints hold no pickle and resume never unpickles one; a checkpoint is
resumed only by the run whose settings it records; an output folder holding a run is not silently replaced; the
final save is staged so a crash never mixes two runs; launches accelerate does not carry out as asked (`--cpu
--num_processes 2`, `--multi_gpu` without a GPU, FSDP on CPU) and an output folder the processes do not all see are
refused before training."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import launch_two_cpu_processes, recipe_args, tiny_model

from prompt_sparsity import PromptedSparseModel, checkpointing
from prompt_sparsity.checkpointing import (
    CheckpointError,
    OutputDirError,
    check_launch,
    check_shared_output_dir,
    lost_processes_message,
    publish_output,
    resolve_resume_checkpoint,
    run_settings,
)
from prompt_sparsity.training import run_pruning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-resnet"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(path)
    return str(path)


def args(base_dir, output_dir, **overrides):
    return recipe_args(base_dir, output_dir, **{"finetune_epochs": 2, **overrides})


@pytest.fixture(scope="module")
def finished(base_dir, tmp_path_factory):
    """A finished VPNs run (1 search + 2 tuning epochs), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_pruning(*args(base_dir, out))
    return out


class Payload:
    """Unpickling this runs code: it writes `marker`. Resume must never get that far."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def plant(path, marker):
    torch.save({"state": Payload(marker)}, path)


# --------------------------------------------------------------------------------------------------- no pickles
def test_checkpoint_holds_no_pickle_and_records_scheduler_and_settings(finished):
    ckpt = finished / "checkpoints" / "stage1-epoch0"
    assert sorted(os.listdir(ckpt)) == ["model.safetensors", "optimizer.pt", "rng_state_0.json", "trainer_state.json"]
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # plain tensors and numbers
    meta = json.load(open(ckpt / "trainer_state.json"))["checkpoint"]
    assert meta["scheduler"]["last_epoch"] == 4  # 2 iterations x 2 steps (prompted + augmented) of tuning epoch 0
    assert meta["settings"]["sparsity"] == 0.8 and meta["settings"]["world_size"] == 1
    assert "output_dir" not in meta["settings"] and "resume_from_checkpoint" not in meta["settings"]
    # No staging folders left behind, in checkpoints/ or beside the final output.
    assert not [d for d in os.listdir(finished / "checkpoints") if d.startswith(".")]
    assert not [d for d in os.listdir(finished) if d.startswith(".")]


def test_planted_pickles_are_never_executed(base_dir, finished, tmp_path, caplog):
    marker = tmp_path / "pwned"
    plant(tmp_path / "probe.pkl", marker)
    torch.load(tmp_path / "probe.pkl", weights_only=False)  # the payload works when unpickled...
    assert marker.exists()
    marker.unlink()
    ckpt = tmp_path / "stage1-epoch0"
    shutil.copytree(finished / "checkpoints" / "stage1-epoch0", ckpt)
    # ...and accelerate's load_state would have loaded these (custom_checkpoint_0.pkl with weights_only=False).
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin", "optimizer.bin"):
        plant(ckpt / name, marker)
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        run_pruning(*args(base_dir, run, resume_from_checkpoint=str(ckpt)))  # trains tuning epoch 1 from it
    assert not marker.exists()
    assert "custom_checkpoint_0.pkl" in caplog.text and "never loaded" in caplog.text
    a, b = load_file(finished / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed exactly despite the planted files

    plant(ckpt / "optimizer.pt", marker)  # a pickle where the optimizer state belongs: refused, not run
    with pytest.raises(CheckpointError, match="optimizer.pt is not a plain tensor file.*not executed"):
        run_pruning(*args(base_dir, tmp_path / "other", resume_from_checkpoint=str(ckpt)))
    assert not marker.exists()


def test_old_accelerate_checkpoint_is_refused_clearly(base_dir, tmp_path):
    ckpt = tmp_path / "old" / "checkpoints" / "stage0-epoch0"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"stage": 0, "epoch": 0, "history": []}))
    plant(ckpt / "custom_checkpoint_0.pkl", tmp_path / "pwned")
    with pytest.raises(CheckpointError, match="older prompt_sparsity.*never loaded.*--overwrite_output_dir"):
        run_pruning(*args(base_dir, tmp_path / "new", resume_from_checkpoint=str(ckpt)))
    assert not (tmp_path / "pwned").exists()


def test_two_process_checkpoint_resumes_exactly_and_only_with_two(base_dir, tmp_path):
    """Every rank writes and restores its own RNG state; the checkpoint records world_size."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch_two_cpu_processes("vpns.py", base_dir, full, "--input_size", "16", "--pad_size", "2")
    ckpt = full / "checkpoints" / "stage0-epoch0"
    assert {"rng_state_0.json", "rng_state_1.json"} <= set(os.listdir(ckpt))
    launch_two_cpu_processes("vpns.py", base_dir, resumed, "--input_size", "16", "--pad_size", "2",
                             "--resume_from_checkpoint", str(ckpt))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="world_size: checkpoint 2, now 1"):
        run_pruning(*args(base_dir, tmp_path / "one", resume_from_checkpoint=str(ckpt)))


# --------------------------------------------------------------------------------------------------- settings
def test_resume_with_other_settings_is_refused(base_dir, finished, tmp_path):
    ckpt = finished / "checkpoints" / "stage0-epoch0"
    with pytest.raises(CheckpointError, match=r"other settings[\s\S]*sparsity: checkpoint 0.8, now 0.5") as e:
        run_pruning(*args(base_dir, tmp_path / "a", sparsity=0.5, resume_from_checkpoint=str(ckpt)))
    assert "seed" not in str(e.value)  # only the differing settings are listed
    run = tmp_path / "b"
    shutil.copytree(finished, run)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* belongs to this run[\s\S]*seed: checkpoint 7, "
                                              r"now 8[\s\S]*finetune_lr: checkpoint 0.01, now 0.02"):
        run_pruning(*args(base_dir, run, seed=8, finetune_lr=0.02, resume_from_checkpoint="latest"))
    assert json.load(open(run / "results.json")) == json.load(open(finished / "results.json"))  # untouched


def _fake_checkpoint(root, name, settings):
    """A small checkpoint with every file resume checks (a model tensor, an optimizer state, the RNG states)."""
    from safetensors.torch import save_file

    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / checkpointing.MODEL_FILE))
    torch.save({"state": {}, "param_groups": []}, path / checkpointing.OPTIMIZER_FILE)
    for rank in range(settings["world_size"]):
        (path / checkpointing.RNG_FILE.format(rank=rank)).write_text(json.dumps(checkpointing.rng_state()))
    state = {"stage": 0, "epoch": 0, "history": [], "timings": {},
             "checkpoint": {"format": checkpointing.CHECKPOINT_FORMAT, "settings": settings, "scheduler": {},
                            "accelerator_step": 0}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return str(path)


def test_latest_picks_the_newest_checkpoint_of_this_run(tmp_path):
    mine = run_settings({"method": "vpns", "sparsity": 0.8, "seed": 7, "output_dir": "x"}, world_size=1)
    other = {**mine, "seed": 8}
    _fake_checkpoint(tmp_path, "stage0-epoch0", mine)
    want = _fake_checkpoint(tmp_path, "stage0-epoch1", mine)
    _fake_checkpoint(tmp_path, "stage0-epoch2", other)  # left by another run after --overwrite_output_dir
    (tmp_path / "checkpoints" / ".partial-stage0-epoch3").mkdir()  # a crash while writing: never picked
    assert resolve_resume_checkpoint("latest", str(tmp_path), mine) == want
    # Operational arguments are not settings: another output_dir or thread count resumes the same run.
    same = run_settings({"method": "vpns", "sparsity": 0.8, "seed": 7, "output_dir": "y", "torch_threads": 2},
                        world_size=1)
    assert resolve_resume_checkpoint("latest", str(tmp_path), same) == want
    with pytest.raises(CheckpointError, match="world_size: checkpoint 1, now 2"):
        resolve_resume_checkpoint("latest", str(tmp_path), {**mine, "world_size": 2})
    # A setting added to the library after the checkpoint was written counts as its default.
    newer = {**mine, "new_knob": 1}
    assert resolve_resume_checkpoint("latest", str(tmp_path), newer, defaults={"new_knob": 1}) == want
    with pytest.raises(CheckpointError, match=r"new_knob: checkpoint 1, now 3"):
        resolve_resume_checkpoint(want, str(tmp_path), {**mine, "new_knob": 3}, defaults={"new_knob": 1})


# --------------------------------------------------------------------------------------------------- output folder
def test_finished_run_is_not_replaced_without_overwrite(base_dir, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = json.load(open(run / "results.json"))
    with pytest.raises(OutputDirError, match=rf"{run} already holds a saved run .*results.json.*"
                                             r"--overwrite_output_dir.*--resume_from_checkpoint latest"):
        run_pruning(*args(base_dir, run, seed=8))
    # A checkpoint from elsewhere would replace it too.
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    with pytest.raises(OutputDirError, match="resuming from a checkpoint of another folder"):
        run_pruning(*args(base_dir, run, resume_from_checkpoint=str(other / "checkpoints" / "stage0-epoch0")))
    assert json.load(open(run / "results.json")) == before
    # Continuing the run saved there is fine: the last checkpoint is its end, the same result comes back.
    run_pruning(*args(base_dir, run, resume_from_checkpoint="latest"))
    assert json.load(open(run / "results.json"))["accuracy"] == before["accuracy"]
    # --overwrite_output_dir replaces the output and keeps checkpoints/.
    (run / "notes.txt").write_text("mine")
    results = run_pruning(*args(base_dir, run, seed=8, overwrite_output_dir=True))
    assert json.load(open(run / "results.json"))["seed"] == 8 == results["seed"]
    assert (run / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(run / "checkpoints")) == ["stage0-epoch0", "stage1-epoch0", "stage1-epoch1"]
    PromptedSparseModel.from_pretrained(run)


def test_unfinished_run_is_not_mixed_with_a_new_one(base_dir, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", run / "checkpoints")
    with pytest.raises(OutputDirError, match=rf"{run} holds checkpoints of an unfinished run.*--overwrite_output_dir"
                                             r".*--resume_from_checkpoint latest"):
        run_pruning(*args(base_dir, run))
    with pytest.raises(OutputDirError, match="resuming from a checkpoint of another folder would add"):
        run_pruning(*args(base_dir, run, resume_from_checkpoint=str(finished / "checkpoints" / "stage0-epoch0")))
    results = run_pruning(*args(base_dir, run, resume_from_checkpoint="latest"))  # continuing it is the fix
    assert results["accuracy"] == json.load(open(finished / "results.json"))["accuracy"]


def _write_output(tag):
    def write(folder):
        for name in ("config.json", "model.safetensors", "preprocessor_config.json", "results.json"):
            with open(os.path.join(folder, name), "w") as f:
                f.write(tag)
    return write


def _snapshot(folder):
    return {n: open(os.path.join(folder, n)).read() for n in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, n))}


def test_publish_output_replaces_the_old_output_and_keeps_the_rest(tmp_path):
    out = tmp_path / "run"
    publish_output(str(out), _write_output("old"))
    (out / "model-00001-of-00002.safetensors").write_text("old shard")  # an old file the new output lacks
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep").write_text("ckpt")
    (out / "notes.txt").write_text("mine")
    publish_output(str(out), _write_output("new"))
    assert _snapshot(out) == {"config.json": "new", "model.safetensors": "new", "preprocessor_config.json": "new",
                              "results.json": "new", "notes.txt": "mine"}
    assert (out / "checkpoints" / "keep").read_text() == "ckpt"
    assert sorted(os.listdir(out)) == sorted([*_snapshot(out), "checkpoints"])  # no dot folders left

    def failing(folder):
        _write_output("half")(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_output(str(out), failing)
    assert _snapshot(out)["config.json"] == "new" and sorted(os.listdir(out)) == sorted([*_snapshot(out),
                                                                                          "checkpoints"])


@pytest.mark.parametrize("crash_at", range(9))
def test_a_crash_while_publishing_never_mixes_two_outputs(tmp_path, monkeypatch, crash_at):
    """Kill the save at every rename: the folder never holds files of both outputs, holds config.json only when
    complete, and every file of both outputs still exists somewhere under it (the rest in its dot folders)."""
    out = tmp_path / "run"
    publish_output(str(out), _write_output("old"))
    real, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        calls.append(src)
        real(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", replace)
    try:
        publish_output(str(out), _write_output("new"))
        crashed = False
    except KeyboardInterrupt:
        crashed = True
    monkeypatch.setattr(checkpointing.os, "replace", real)
    top = _snapshot(out)
    tags = set(top.values())
    assert len(tags) <= 1, top  # never old and new files side by side
    if "config.json" in top:  # loadable only when complete
        assert set(top) == {"config.json", "model.safetensors", "preprocessor_config.json", "results.json"}, top
    everything = {}
    for dirpath, _, files in os.walk(out):
        for name in files:
            everything.setdefault(open(os.path.join(dirpath, name)).read(), set()).add(name)
    if crashed:
        assert everything["old"] == everything["new"] == {"config.json", "model.safetensors",
                                                          "preprocessor_config.json", "results.json"}
    else:
        assert tags == {"new"}


def test_interrupted_save_is_named_when_the_folder_is_refused(base_dir, tmp_path):
    out = tmp_path / "run"
    publish_output(str(out), _write_output("old"))
    (out / ".previous-abc").mkdir()
    with pytest.raises(OutputDirError, match=r"earlier final save was interrupted.*\.previous-abc"):
        run_pruning(*args(base_dir, out))


# --------------------------------------------------------------------------------------------------- launch
LAUNCHED_CPU_2 = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1"}
PARENT = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "recipes/vpns.py"]


def test_lost_processes_detected_from_the_launcher_environment():
    message = lost_processes_message(1, LAUNCHED_CPU_2, PARENT)
    assert "asked for 2 processes but started only this one" in message
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in message
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes 2"):
        check_launch(1, LAUNCHED_CPU_2, PARENT)
    assert "--num_processes 3" in lost_processes_message(1, LAUNCHED_CPU_2, ["accelerate", "launch",
                                                                             "--num_processes=3", "x.py"])
    # No parent command line to read (a config file asked): still caught, by MASTER_PORT without a world size.
    assert "several processes" in lost_processes_message(1, LAUNCHED_CPU_2, [])
    # Real multi-process launches and plain single-process ones pass.
    assert lost_processes_message(2, LAUNCHED_CPU_2, PARENT) is None
    assert lost_processes_message(1, {**LAUNCHED_CPU_2, "WORLD_SIZE": "2"}, PARENT) is None  # torchrun
    assert lost_processes_message(1, {**LAUNCHED_CPU_2, "PMI_SIZE": "2"}, PARENT) is None  # mpirun
    single = {k: v for k, v in LAUNCHED_CPU_2.items() if not k.startswith("MASTER")}
    assert lost_processes_message(1, single, PARENT[:4] + PARENT[6:]) is None  # accelerate launch --cpu
    assert lost_processes_message(1, {"MASTER_PORT": "29500"}, None) is None  # not launched by accelerate
    assert lost_processes_message(1, LAUNCHED_CPU_2, ["accelerate", "launch", "--num_processes", "1"]) is None


def test_accelerate_launch_cpu_two_processes_is_refused(base_dir, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "recipes", "vpns.py"),
           "--model_name_or_path", base_dir, "--dataset_name", "digits", "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asked for 2 processes but started only this one" in proc.stderr
    assert "--multi_gpu --num_processes 2" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


TORCHRUN_2 = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29500", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


def test_a_world_size_accelerate_ignores_is_refused():
    from accelerate.utils import DistributedType

    # `accelerate launch --multi_gpu --num_processes 2` without --cpu on a machine without a GPU: torchrun starts
    # two processes, each of which accelerate runs alone.
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*add --cpu after the recipe \(or set ACCELERATE_USE_CPU=true"):
        check_launch(1, TORCHRUN_2, [], distributed_type=DistributedType.NO)
    with pytest.raises(RuntimeError, match="LOCAL_WORLD_SIZE=3"):
        check_launch(1, {"LOCAL_WORLD_SIZE": "3"}, [], distributed_type=DistributedType.NO)
    check_launch(2, TORCHRUN_2, [], distributed_type=DistributedType.MULTI_CPU)  # accelerate uses them: fine
    check_launch(1, {**TORCHRUN_2, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, [], distributed_type=DistributedType.NO)


def test_fsdp_asked_for_but_not_active_is_refused():
    from accelerate.utils import DistributedType

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        with pytest.raises(RuntimeError, match=f"FSDP was asked for .* accelerate runs {kind.value}, not FSDP.*drop "
                                               "--use_fsdp"):
            check_launch(2 if kind != DistributedType.NO else 1, {"ACCELERATE_USE_FSDP": "True"}, [],
                         distributed_type=kind)
    check_launch(2, {"ACCELERATE_USE_FSDP": "true"}, [], distributed_type=DistributedType.FSDP)
    check_launch(1, {"ACCELERATE_USE_FSDP": "false"}, [], distributed_type=DistributedType.NO)


def test_fsdp_on_cpu_stops_the_run_before_anything_is_written(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(RuntimeError, match="FSDP was asked for"):
        run_pruning(*args(base_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trap is --multi_gpu on a machine without a GPU")
def test_multi_gpu_without_a_gpu_is_refused_by_every_process(base_dir, tmp_path):
    # --monitor_interval: torchrun looks at its children every 10 s, not 0.1 s, so a rank that fails first does not
    # get rank 0 (the one that prints) killed before it has printed.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--monitor_interval", "10",
           os.path.join(ROOT, "recipes", "vpns.py"), "--model_name_or_path", base_dir, "--dataset_name", "digits",
           "--output_dir", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("recipes/vpns.py: error:")]
    # One line from the recipe (rank 0 prints it; torchrun adds its own report of the failed children), and both
    # processes stopped with the recipes' usage-error code.
    assert len(errors) == 1 and "WORLD_SIZE=2" in errors[0] and "ACCELERATE_USE_CPU=true" in errors[0], proc.stderr
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _check_output_dir_in_process(root: str, separate_disks: bool):
    """One process of `debug_launcher`: the output folder it checks is the same path on another "disk" per rank."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # forked from pytest: start from this launch's environment
    PartialState._reset_state()
    acc = Accelerator(cpu=True)
    out = os.path.join(root, f"disk{acc.process_index}" if separate_disks else "shared", "run")
    try:
        check_shared_output_dir(acc, out)
        outcome = "ok"
    except RuntimeError as err:
        outcome = str(err)
    with open(os.path.join(root, f"outcome{acc.process_index}.txt"), "w") as f:
        f.write(outcome)
    acc.end_training()


@pytest.mark.parametrize("separate_disks", [False, True])
def test_output_dir_not_seen_by_every_process_is_refused_before_training(tmp_path, separate_disks):
    from accelerate import debug_launcher

    debug_launcher(_check_output_dir_in_process, args=(str(tmp_path), separate_disks), num_processes=2)
    outcomes = [(tmp_path / f"outcome{rank}.txt").read_text() for rank in (0, 1)]
    if not separate_disks:
        assert outcomes == ["ok", "ok"]
        assert os.listdir(tmp_path / "shared" / "run") == []  # the marker is gone
        return
    for outcome in outcomes:  # every process stops, with the same one-line message
        assert "is not shared by all processes: rank 1 on " in outcome and "rank 0" not in outcome
        assert "Fix: put --output_dir on storage every machine mounts" in outcome
    assert not os.path.exists(tmp_path / "disk1" / "run")  # rank 1 wrote nothing on its own disk
