"""Checkpoints of a training run: written atomically, found again, pruned, resumed from.

A checkpoint is a folder `<output_dir>/checkpoint_{step}/` (or `checkpoint_final/`):

    model.safetensors     the trainable parameters under TinyGPTV's names, plus the frozen ones
                          no `pretrained` file restores (random-init parts, a frozen LoRA), so a
                          checkpoint never depends on the seed it was built with
    meta.json             {"step", "epoch", "config", "world_size", "trainable"}
    resume_state/         what an exact resume needs besides the weights:
                          optimizer / scaler / RNG states written by `accelerator.save_state`
                          (so DDP, FSDP and DeepSpeed each save theirs their own way), and
                          `data_rank{r}.pt`, each process's data-loader position; under FSDP2
                          (distributed.py) `optimizer.bin` is the whole optimiser state keyed
                          by parameter name, gathered from the shards and written by rank 0

Shared files (model.safetensors, meta.json, optimizer.bin) are written by the main process
alone; each process writes only the files named after its rank.

Everything is first written to a hidden `.checkpoint_{step}.tmp/` folder and renamed into
place once complete, so an interrupted write (crash, SIGKILL, full disk) never touches the
previous checkpoint; hidden folders are ignored when looking for checkpoints and removed on
the next save.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file
from torch import nn

from ..checkpoints import save_safetensors_atomic
from ..checkpoints.export import FORMAT_METADATA
from ..models.parameters import checkpoint_parameter_names, parameter_groups
from .distributed import copy_into, full_optimizer_state, full_tensor, is_sharded, load_full_optimizer_state

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
RESUME_DIR = "resume_state"
FINAL = "checkpoint_final"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed by this run (weights only, other world size, ...)."""


# --- writing ------------------------------------------------------------------------------------

def trainable_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (and frozen random-init ones, see checkpoint_parameter_names) as
    CPU tensors, complete on the main process. Collective under FSDP2 (each sharded tensor is
    gathered, in the same order everywhere) and DeepSpeed ZeRO-3: call on every process."""
    names = checkpoint_parameter_names(accelerator.unwrap_model(model))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_state(accelerator, model, names)
    full = accelerator.get_state_dict(model)
    return {name: full_tensor(full[name]).detach().to("cpu").contiguous() for name in names}


def _deepspeed_state(accelerator: Accelerator, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Trainable parameters from DeepSpeed's fp32 master copy (the module itself holds 16-bit ones
    under bf16/fp16); frozen ones from the (ZeRO-3: gathered) module. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param
    params = dict(accelerator.unwrap_model(model).named_parameters())
    full = accelerator.get_state_dict(model) or {}  # ZeRO-3: complete on rank 0 only
    state = {}
    for name in names:
        value = safe_get_full_fp32_param(params[name]) if params[name].requires_grad else full.get(name)
        if value is not None and accelerator.is_main_process:
            state[name] = value.detach().to("cpu").contiguous()
    return state


def write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, model: nn.Module, loader, output_dir: Path, name: str,
                    meta: dict, optimizer=None) -> Path:
    """Write `output_dir/name` on every process's behalf; returns its path. Collective.
    `optimizer`: one that accelerate does not hold (FSDP2's), saved here whole.

    A full disk becomes OSError(ENOSPC) naming the folder, whatever library was writing
    (safetensors and torch.save report it in their own words)."""
    try:
        return _save_checkpoint(accelerator, model, loader, output_dir, name, meta, optimizer)
    except Exception as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        if any(words in str(e) for words in ("No space left", "StorageFull", "Disk quota")):
            raise OSError(errno.ENOSPC, "No space left on device", str(output_dir / f".{name}.tmp")) from e
        raise


def _save_checkpoint(accelerator: Accelerator, model: nn.Module, loader, output_dir: Path, name: str,
                     meta: dict, optimizer=None) -> Path:
    final, tmp = output_dir / name, output_dir / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier interrupted write
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = trainable_state(accelerator, model)
    if accelerator.is_main_process:
        save_safetensors_atomic(weights, tmp / MODEL_FILE,
                                {**FORMAT_METADATA, "content": "trainable", "step": str(meta["step"])})
        trainable = sorted(n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad)
        write_json({**meta, "trainable": trainable}, tmp / META_FILE)
    accelerator.save_state(str(tmp / RESUME_DIR))
    if optimizer is not None:
        optimizer_state = full_optimizer_state(model, optimizer)  # collective
        if accelerator.is_main_process:
            torch.save(optimizer_state, tmp / RESUME_DIR / "optimizer.bin")
    torch.save(loader.state_dict(), tmp / RESUME_DIR / f"data_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (a re-run over an old checkpoint) is moved aside first
    and deleted only once src is in place."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def exclude_model_from_accelerate_state(accelerator: Accelerator) -> None:
    """`save_state` / `load_state` would write and read the whole model; ours are the trainable
    parameters in model.safetensors, so drop the models from accelerate's own files."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


# --- finding and pruning --------------------------------------------------------------------------

class MetaError(ValueError):
    """meta.json is missing, unreadable or lacks its step."""


def read_meta(checkpoint: Path) -> dict:
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        int(meta["step"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise MetaError(f"{path}: unreadable checkpoint description ({type(e).__name__}: {e})") from None
    return meta


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    if not Path(output_dir).is_dir():
        return []
    return [folder for folder in Path(output_dir).iterdir()
            if folder.name.startswith("checkpoint_") and (folder / META_FILE).is_file()]


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in output_dir, oldest first; hidden
    (in-progress or interrupted) folders are not checkpoints, nor are folders whose meta.json
    cannot be read (see `unreadable_checkpoints`)."""
    found = []
    for folder in _checkpoint_folders(output_dir):
        try:
            found.append((int(read_meta(folder)["step"]), folder))
        except MetaError:
            continue
    # at equal steps checkpoint_final sorts last, so "latest" prefers it
    return sorted(found, key=lambda item: (item[0], item[1].name == FINAL))


def unreadable_checkpoints(output_dir: Path) -> list[str]:
    """One message per checkpoint folder whose meta.json is damaged (a torn write, a full disk)."""
    problems = []
    for folder in _checkpoint_folders(output_dir):
        try:
            read_meta(folder)
        except MetaError as e:
            problems.append(str(e))
    return problems


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` numbered checkpoints (never checkpoint_final)."""
    numbered = [folder for _, folder in list_checkpoints(output_dir) if folder.name != FINAL]
    doomed = numbered[:-keep_last] if keep_last > 0 else numbered
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to a hidden `.checkpoint_N.damaged[-k]` folder: no longer found,
    resumed or counted by `keep_last` pruning, but kept for the user to look at."""
    target = checkpoint.with_name(f".{checkpoint.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f".{checkpoint.name}.damaged-{n}")
    os.rename(checkpoint, target)
    return target


# --- checking before reading ----------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """A file of a checkpoint that is missing or cannot be read."""
    file: Path
    reason: str
    essential: bool  # the weights or the description: no resume without it, inexact or not

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def resume_files(checkpoint: Path, world_size: int, optimizer: bool = True, scaler: bool = False) -> list[Path]:
    """The resume-state files an exact resume reads (accelerate's names)."""
    folder = Path(checkpoint) / RESUME_DIR
    files = [folder / "optimizer.bin"] if optimizer else []
    files += [folder / "scaler.pt"] if scaler else []
    files += [folder / f"random_states_{rank}.pkl" for rank in range(world_size)]
    files += [folder / f"data_rank{rank}.pt" for rank in range(world_size)]
    return files


def checkpoint_problems(checkpoint: Path, optimizer: bool = True, scaler: bool = False) -> list[Problem]:
    """Read every file a resume needs, applying nothing; one Problem per file that fails.

    `optimizer`: whether optimizer.bin is ours to check (FSDP / DeepSpeed write their own layout)."""
    checkpoint = Path(checkpoint)
    try:
        meta = read_meta(checkpoint)
    except MetaError as e:
        return [Problem(checkpoint / META_FILE, str(e).split(": ", 1)[1], essential=True)]
    problems = []
    weights = checkpoint / MODEL_FILE
    try:
        load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for a torn file
        problems.append(Problem(weights, _reason(e), essential=True))
    if not (checkpoint / RESUME_DIR).is_dir():
        return problems + [Problem(checkpoint / RESUME_DIR, "missing: the checkpoint holds weights only (it can "
                                   "start a new stage as model.ckpt but cannot be resumed)", essential=True)]
    for file in resume_files(checkpoint, int(meta.get("world_size", 1)), optimizer, scaler):
        try:
            accelerate_load(file, map_location="cpu")
        except Exception as e:
            problems.append(Problem(file, _reason(e), essential=False))
    return problems


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    text = " ".join(str(error).split())
    return f"unreadable, damaged or truncated ({type(error).__name__}: {text[:200]})"


# --- reading --------------------------------------------------------------------------------------

def load_trainable(model: nn.Module, checkpoint: Path) -> None:
    """Copy model.safetensors into the model's trainable parameters; the names must match
    exactly (a checkpoint of another stage's trainable groups is a `model.ckpt`, not a resume).
    Sharded (FSDP2) parameters take their own shard of each tensor."""
    tensors = load_file(str(Path(checkpoint) / MODEL_FILE))
    params = dict(model.named_parameters())
    expected = set(checkpoint_parameter_names(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ResumeError(f"{checkpoint}: its trainable parameters differ from this run's "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}); "
                         f"was model.trainable changed since it was written?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            copy_into(params[name], tensor)


def check_same_run(accelerator: Accelerator, model: nn.Module, checkpoint: Path, meta: dict,
                   mode: str | None = None) -> None:
    """What a resume cannot change: the number of processes, the strategy (each keeps its
    optimiser state its own way), and which parameters train."""
    written = meta.get("distributed", "ddp")
    if mode is not None and written != mode:
        raise ResumeError(f"{checkpoint} was written with run.distributed.mode {written}; resume it with the same "
                          f"mode (now {mode})")
    if meta.get("world_size", 1) != accelerator.num_processes:
        raise ResumeError(f"{checkpoint} was written by {meta.get('world_size', 1)} processes; resume it with "
                         f"the same number (now {accelerator.num_processes}) so every data shard continues "
                         f"where it stopped")
    model = accelerator.unwrap_model(model)
    now = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if "trainable" in meta and meta["trainable"] != now:
        raise ResumeError(f"model.trainable changed since {checkpoint} was written: "
                         f"{_trainable_change(model, meta, now)}. A resume continues the same optimiser over "
                         f"the same parameters; to train other groups, start a new run (another run.output_dir) "
                         f"with model.ckpt={checkpoint}")


def _trainable_change(model: nn.Module, meta: dict, now: list[str]) -> str:
    """'groups added [lora], removed [llm_norms]' from the groups of the parameter names."""
    groups_of = {name: group for group, params in parameter_groups(model).items() for name in params}
    before = {groups_of.get(name, name) for name in meta["trainable"]}
    after = {groups_of.get(name, name) for name in now}
    added, removed = sorted(after - before), sorted(before - after)
    if not added and not removed:
        return "the same groups, but other parameters in them (was the model section changed?)"
    return f"groups added {added}, removed {removed} (then: {sorted(before)}, now: {sorted(after)})"


def load_resume_state(accelerator: Accelerator, model: nn.Module, loader, checkpoint: Path,
                      missing: list[Path] = (), optimizer=None, mode: str | None = None) -> dict:
    """Restore weights, optimiser, scaler, RNGs and data position; returns the checkpoint's meta.

    `missing`: resume-state files known to be absent or unreadable (an inexact resume, see
    `run.resume_inexact`); what they hold starts afresh, everything else is restored (then
    `optimizer` is the prepared optimiser to restore). Under FSDP2 `optimizer` is the trainer's
    own, restored from the whole state here; under DeepSpeed the engine's checkpoint restores
    the weights and the optimiser."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    if not (checkpoint / RESUME_DIR).is_dir():
        raise ResumeError(f"{checkpoint} holds weights only (no {RESUME_DIR}/): it can start a new stage "
                         f"as model.ckpt but cannot be resumed")
    check_same_run(accelerator, model, checkpoint, meta, mode)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        load_trainable(accelerator.unwrap_model(model), checkpoint)
    folder, rank = checkpoint / RESUME_DIR, accelerator.process_index
    if not missing:
        accelerator.load_state(str(folder))
        if is_sharded(model) and optimizer is not None:
            load_full_optimizer_state(model, optimizer, torch.load(folder / "optimizer.bin", weights_only=True))
    else:
        _load_available_state(accelerator, model, optimizer, folder, set(map(Path, missing)))
    data_file = folder / f"data_rank{rank}.pt"
    if data_file not in set(map(Path, missing)):
        loader.load_state_dict(torch.load(data_file, weights_only=True))
    else:  # the mix of datasets continues; each dataset's position starts its epoch again
        loader.step = int(meta["step"]) * int(meta.get("config", {}).get("run", {}).get("accum_grad_iters", 1))
    return meta


def _load_available_state(accelerator: Accelerator, model: nn.Module, optimizer, folder: Path,
                          missing: set[Path]) -> None:
    """The parts of `accelerator.load_state` whose files are there (single process / DDP layout)."""
    optimizer_file, scaler_file = folder / "optimizer.bin", folder / "scaler.pt"
    if optimizer_file not in missing and optimizer is not None:
        state = accelerate_load(optimizer_file, map_location="cpu")
        if is_sharded(model):
            load_full_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
    if accelerator.scaler is not None and scaler_file not in missing:
        accelerator.scaler.load_state_dict(accelerate_load(scaler_file))
    if folder / f"random_states_{accelerator.process_index}.pkl" not in missing:
        load_accelerator_state(str(folder), [], [], [], [], accelerator.process_index)
