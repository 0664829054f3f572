"""Reading and writing weight files, safely.

Foreign files (`.pth`, `.bin`) are read with `torch.load(weights_only=True)`: plain pickle can
run arbitrary code, so a file holding more than tensors and plain containers is refused
rather than trusted. The refusal says what the file asked to run and how to convert it once,
explicitly, if the user trusts it (`convert_checkpoint.py unpickle --trust-pickle`).
Safetensors files are opened lazily, so taking the vision weights out of a 15 GB Hugging Face
BLIP-2 folder reads only those.

Our own files are written atomically (temporary file + `os.replace`): a crash while saving
leaves the previous file intact, never a truncated one. Their permissions follow the umask
like any other file (safetensors itself would create them 0600).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Inside a folder, in the order they are tried: Hugging Face layouts (sharded or single) and ours.
FOLDER_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                       "pytorch_model.bin.index.json", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# Top-level keys under which checkpoint dicts nest their state dict (LAVIS runner: "model").
NESTED_STATE_KEYS = ("model", "state_dict", "module")


class CheckpointError(RuntimeError):
    """A weight file that cannot be read or does not fit the model; names the file."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path, self.message = str(path), message
        super().__init__(f"{self.path}: {message}")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path as given, or a Hugging Face hub id (`owner/name`) downloaded (weights and
    JSON only) into the hub cache."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    text = str(source)
    # `owner/name`; not `Path.suffix`, which calls "Salesforce/blip2-opt-2.7b" a ".7b" file
    looks_like_hub_id = re.fullmatch(r"\w[\w.-]*/[\w.-]+", text) and not text.endswith(WEIGHT_SUFFIXES)
    if not looks_like_hub_id:
        raise CheckpointError(source, "no such file or folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, ...: say which source and why
        raise CheckpointError(source, f"not a local path, and fetching it from the hub failed: {e}") from e


def read_state_dict(source: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """name -> tensor from a file or folder: `.safetensors` (lazy), a Hugging Face or our folder,
    or a torch file (`weights_only`) possibly nesting the state dict under `model`."""
    path = resolve_source(source)
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        return SafetensorsState({path})
    return _read_torch_file(path)


def _read_folder(folder: Path) -> Mapping[str, torch.Tensor]:
    for name in FOLDER_WEIGHT_FILES:
        file = folder / name
        if not file.exists():
            continue
        if name.endswith(".index.json"):
            return _read_sharded(file)
        return SafetensorsState({file}) if name.endswith(".safetensors") else _read_torch_file(file)
    raise CheckpointError(folder, f"folder holds no weight file; expected one of {', '.join(FOLDER_WEIGHT_FILES)}")


def _read_sharded(index_file: Path) -> Mapping[str, torch.Tensor]:
    try:
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(index_file, f"unreadable shard index ({e})") from e
    shards = sorted({index_file.parent / shard for shard in weight_map.values()})
    if index_file.name.startswith("model.safetensors"):
        return SafetensorsState(shards)
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(_read_torch_file(shard))
    return merged


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap keeps multi-GB files out of RAM until a tensor is used; files from torch < 1.6
        # (legacy format) cannot be mapped and are read whole.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = pickled_code(e)
        if code is not None:
            raise CheckpointError(path, unsafe_pickle_message(path, code)) from None
        raise CheckpointError(path, f"cannot be read as a torch checkpoint; the file is corrupt or "
                                    f"truncated (an interrupted download?): {_unpickler_detail(e)}") from None
    except Exception as e:
        raise CheckpointError(path, f"cannot be read as a torch checkpoint; the file is corrupt or "
                                    f"truncated (an interrupted download?): {type(e).__name__}: "
                                    f"{_without_advice(str(e))}") from None
    return _unwrap_state_dict(path, obj)


# How torch's weights_only unpickler names the import it refused, across versions: "Unsupported
# global: GLOBAL __main__.Evil was not an allowed global", "unsupported GLOBAL posix.system whose
# module posix is blocked", "Unsupported class ...". (Calling anything needs such an import
# first. "Unsupported operand N" is what random bytes give: damage, not code.)
_REFUSED = (re.compile(r"GLOBAL\s+([\w.]+)", re.IGNORECASE),
            re.compile(r"unsupported (?:class|global)\W+([\w.]+)", re.IGNORECASE))


def pickled_code(error: Exception) -> str | None:
    """What torch's safe unpickler refused (e.g. `posix.system`), or None if it is not that kind
    of refusal (a damaged file)."""
    text = str(error)
    for pattern in _REFUSED:
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


def unsafe_pickle_message(path: Path, code: str) -> str:
    return (f"holds Python code or objects other than tensors (it asks to run or build {code}), so it was "
            f"refused for safety: loading it could run that code on this machine. Only if you trust where the "
            f"file came from, convert it once to safetensors with: python scripts/convert_checkpoint.py "
            f"unpickle {path} --trust-pickle --out {Path(path).with_suffix('.safetensors').name}")


def _without_advice(text: str) -> str:
    """torch's message minus its advice to retry with weights_only=False (never ours to give)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return " ".join(s for s in sentences if "weights_only" not in s and "arbitrary code" not in s
                    and "trusted source" not in s)


def _unpickler_detail(error: Exception) -> str:
    """The one informative line of torch's long weights_only message."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return _without_advice(text.split("Check the documentation", 1)[0])


def convert_trusted_pickle(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The tensors of a pickled checkpoint that `read_state_dict` refuses, written as safetensors.

    This UNPICKLES THE FILE WITH weights_only=False: whatever code it holds runs. It exists for
    a file the user trusts (`convert_checkpoint.py unpickle --trust-pickle`); nothing in the
    framework calls it. Non-tensor values are dropped, and said so."""
    source = Path(source)
    obj = torch.load(source, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping):
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(source, f"holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(source, "holds no tensors")
    dropped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if dropped:
        print(f"{source}: left out {len(dropped)} non-tensor entries: {', '.join(dropped[:10])}"
              f"{' ...' if len(dropped) > 10 else ''}")
    return save_safetensors_atomic(tensors, out, {"converted_from": source.name})


def _unwrap_state_dict(path: Path, obj) -> dict[str, torch.Tensor]:
    """The runner saves {"model": state_dict, "optimizer": ..., "epoch": ...}: take the weights."""
    if isinstance(obj, Mapping):
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "is not a state dict (name -> tensor), nor a dict holding one under "
                                    f"{' / '.join(repr(k) for k in NESTED_STATE_KEYS)}")
    return dict(obj)


class SafetensorsState(Mapping):
    """Read-only name -> tensor view over one or more safetensors files; tensors are read
    from disk when asked for."""

    def __init__(self, files):
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(file, f"cannot be read as safetensors; the file is corrupt or "
                                            f"truncated (an interrupted download or save?): {e}") from e
            self._handles[file] = handle
            self._file_of.update({key: file for key in handle.keys()})

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for handle in self._handles.values():
            merged.update(handle.metadata() or {})
        return merged

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:
            raise CheckpointError(file, f"cannot read tensor '{key}'; the file is corrupt: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to `path` via a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_unshared(tensors), str(tmp), metadata=dict(metadata or {}))
        # safetensors creates its file 0600; a weight file is shared like any other (the umask decides)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it: set and restore at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give repeats their own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
