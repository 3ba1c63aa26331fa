"""Checks that turn obscure loading failures into errors naming the problem and the fix: a model source that does
not exist, a saved subnetwork given where a plain base model belongs, truncated or garbage weight and checkpoint
files. The loaders call these; nothing here changes what is loaded."""

from __future__ import annotations

import json
import os
import pickletools
import struct
import zipfile

#: Files of a checkpoint (accelerate `save_state`) or a saved model whose integrity can be checked without loading.
_SAFETENSORS_SUFFIX = ".safetensors"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def looks_like_local_path(name: str) -> bool:
    """A string the user meant as a folder (absolute, ./, ~, or more than one '/'), not as a Hub 'org/name' id."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def missing_source_error(name: str, revision: str | None = None, cause: BaseException | None = None) -> OSError:
    """The error for a model that is neither a local folder nor a loadable Hub repo id."""
    from huggingface_hub import constants

    if looks_like_local_path(name):
        return OSError(
            f"There is no local folder {name!r}, and it is not a Hub repo id either. Fix: check the path (a folder "
            "with config.json and model.safetensors, as written by save_pretrained)."
        )
    where = ("it is not in the local Hugging Face cache (offline mode is on: HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
             else "it could not be fetched from the Hub (misspelt, private or gated?"
             + (f" {type(cause).__name__}: {str(cause).splitlines()[0][:200]}" if cause else "") + ")")
    rev = f" at revision {revision!r}" if revision else ""
    return OSError(
        f"There is no local folder {name!r}, and as a Hub repo id{rev} {where}. Fix: check the path or the repo id; "
        f"for a Hub model, download it once with network access (`hf download {name}`), or pass a local folder."
    )


def refuse_subnetwork_as_base(config, name: str | None) -> None:
    """A saved PromptedSparseModel wrapped again would apply its prompt (and mask) twice."""
    if getattr(config, "model_type", None) == "prompted_sparse":
        base = getattr(config, "base_model_name_or_path", None)
        base = f" ({base!r} for this one)" if base else ""
        raise ValueError(
            f"{name or 'this model'} is a saved prompt_sparsity subnetwork (config model_type 'prompted_sparse'), not "
            "a plain base classifier: wrapping it again would apply its prompt twice. Fix: load it with "
            "PromptedSparseModel.from_pretrained(...), or move it to another dataset with "
            "`recipes/transfer.py --subnetwork ...`; give --model_name_or_path / from_base the plain pretrained "
            f"base{base}."
        )


def safetensors_problem(path: str) -> str | None:
    """Why a .safetensors file cannot be loaded (truncated, garbage header, ...), or None if its layout is sound."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"only {size} bytes long"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return f"the header claims {n} bytes but the file has {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable header ({type(err).__name__}: {err})"
    if not isinstance(header, dict):
        return "the header is not a table of tensors"
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "the header is not a table of tensors"
    if 8 + n + end != size:
        return f"its tensors need {8 + n + end} bytes but the file has {size}"
    return None


def torch_file_problem(path: str) -> str | None:
    """Why a torch.save file (a zip archive) is damaged, or None (CRC-checked; a legacy non-zip file is not judged)."""
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                raw = f.read()
            if raw[:1] != b"\x80":
                return "neither a torch.save archive nor a pickle (truncated or overwritten)"
            # A plain pickle (accelerate's random states): walk its opcodes without executing any.
            for _ in pickletools.genops(raw):
                pass
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"member {bad!r} fails its checksum" if bad else None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"


def damaged_files(folder: str) -> list[tuple[str, str]]:
    """`[(path, problem)]` for the weight/state files of a saved model or checkpoint folder that are damaged."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        problem = None
        if name.endswith(_SAFETENSORS_SUFFIX):
            problem = safetensors_problem(path)
        elif name.endswith(_TORCH_SUFFIXES):
            problem = torch_file_problem(path)
        elif name.endswith(".json"):
            try:
                with open(path) as f:
                    json.load(f)
            except (OSError, ValueError) as err:
                problem = f"not valid JSON ({err})"
        if problem:
            found.append((path, problem))
    return found


def local_folder_of(name_or_path: str, revision: str | None = None) -> str | None:
    """The folder holding a model's files: the path itself, or the cached snapshot of a Hub id (None if neither)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a repo id: nothing cached to inspect
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def corrupted_model_error(name_or_path: str, revision: str | None, cause: BaseException) -> ValueError | None:
    """A clear error for a load that failed on a damaged weights file, or None if no file is damaged."""
    folder = local_folder_of(str(name_or_path), revision)
    damaged = damaged_files(folder) if folder else []
    if not damaged:
        return None
    path, problem = damaged[0]
    return ValueError(
        f"{path} is corrupted or incomplete ({problem}; {type(cause).__name__}: {str(cause)[:200]}). Fix: save or "
        "download the model again (an interrupted copy or download leaves such a file); a Hub download is redone "
        "with `hf download ... --force-download`."
    )


def refuse_damaged_checkpoint(folder: str, state_file: str = "trainer_state.json", problems=damaged_files,
                              context: str = "") -> None:
    """Before resuming: refuse a checkpoint with a truncated, garbage or missing file, naming it and the usable ones.
    `problems(folder) -> [(path, why)]` judges a checkpoint folder (the checkpoint format knows more than the file
    layouts); `context` opens the message."""
    damaged = problems(folder)
    if not damaged:
        return
    parent, here = os.path.split(os.path.normpath(folder))
    others = sorted(d for d in os.listdir(parent or ".")
                    if d != here and not d.startswith(".") and os.path.isfile(os.path.join(parent, d, state_file))
                    and not problems(os.path.join(parent, d)))
    listing = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
    hint = f" (intact ones next to it: {', '.join(others)})" if others else ""
    raise ValueError(
        f"{context}The checkpoint {folder} is corrupted or incomplete - {listing}. Fix: resume from another "
        f"checkpoint with --resume_from_checkpoint <folder>{hint}, or delete this folder (a crash or a full disk "
        "while saving leaves it half-written) and start again."
    )


def load_checked(load, name_or_path, revision: str | None = None):
    """Run `load()` (a `from_pretrained` of `name_or_path`), turning a missing source or a damaged weights file into
    an error that says so; any other failure is re-raised unchanged."""
    from safetensors import SafetensorError

    name = str(name_or_path)
    if not os.path.isdir(name) and looks_like_local_path(name):
        raise missing_source_error(name, revision)
    try:
        return load()
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        clear = corrupted_model_error(name, revision, err)
        if clear is not None:
            raise clear from err
        if isinstance(err, OSError) and local_folder_of(name, revision) is None:
            raise missing_source_error(name, revision, err) from err
        raise


def saved_config(name_or_path, revision: str | None = None) -> dict | None:
    """A saved model's config.json as a dict (None if it cannot be read: the load itself then says why)."""
    from transformers import PretrainedConfig

    try:
        data, _ = PretrainedConfig.get_config_dict(str(name_or_path), revision=revision)
    except (OSError, ValueError):
        return None
    return data


def saved_num_labels(data: dict | None) -> int | None:
    """The number of classes recorded in a saved config dict."""
    if not data:
        return None
    if data.get("id2label"):
        return len(data["id2label"])
    return data.get("num_labels")


def refuse_plain_model_as_subnetwork(data: dict | None, name) -> None:
    """`PromptedSparseModel.from_pretrained` on a plain classifier would build a default base and load nothing."""
    model_type = (data or {}).get("model_type")
    if model_type and model_type != "prompted_sparse":
        raise ValueError(
            f"{name} is a plain {model_type!r} model, not a saved prompt_sparsity subnetwork (config model_type "
            "'prompted_sparse'): none of its weights would load. Fix: wrap it with PromptedSparseModel.from_base("
            f"{str(name)!r}, ...) or pass it as --model_name_or_path to recipes/vpns.py or recipes/pass.py."
        )
