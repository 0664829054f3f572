"""Checkpoints of a training run: written atomically, found again, pruned, resumed from.

A checkpoint is a folder `<output_dir>/checkpoint_{step}/` (or `checkpoint_final/`):

    model.safetensors     the trainable parameters under TinyGPTV's names, plus the frozen ones
                          no `pretrained` file restores (random-init parts, a frozen LoRA), so a
                          checkpoint never depends on the seed it was built with
    meta.json             {"step", "epoch", "config", "world_size", "trainable"}
    resume_state/         what an exact resume needs besides the weights:
                          optimizer / scaler / RNG states written by `accelerator.save_state`
                          (so DDP, FSDP and DeepSpeed each save theirs their own way), and
                          `data_rank{r}.pt`, each process's data-loader position

Everything is first written to a hidden `.checkpoint_{step}.tmp/` folder and renamed into
place once complete, so an interrupted write (crash, SIGKILL, full disk) never touches the
previous checkpoint; hidden folders are ignored when looking for checkpoints and removed on
the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from ..checkpoints import save_safetensors_atomic
from ..checkpoints.export import FORMAT_METADATA
from ..models.parameters import checkpoint_parameter_names

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
RESUME_DIR = "resume_state"
FINAL = "checkpoint_final"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed by this run (weights only, other world size, ...)."""


# --- writing ------------------------------------------------------------------------------------

def trainable_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (and frozen random-init ones, see checkpoint_parameter_names) as
    CPU tensors. Collective under FSDP: call on every process."""
    names = checkpoint_parameter_names(accelerator.unwrap_model(model))
    full = accelerator.get_state_dict(model)
    return {name: full[name].detach().to("cpu").contiguous() for name in names}


def write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, model: nn.Module, loader, output_dir: Path, name: str,
                    meta: dict) -> Path:
    """Write `output_dir/name` on every process's behalf; returns its path. Collective."""
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

def read_meta(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / META_FILE).read_text())


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in output_dir, oldest first; hidden
    (in-progress or interrupted) folders are not checkpoints."""
    found = []
    if not Path(output_dir).is_dir():
        return found
    for folder in Path(output_dir).iterdir():
        if folder.name.startswith("checkpoint_") and (folder / META_FILE).is_file():
            found.append((int(read_meta(folder)["step"]), folder))
    # at equal steps checkpoint_final sorts last, so "latest" prefers it
    return sorted(found, key=lambda item: (item[0], item[1].name == FINAL))


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


# --- reading --------------------------------------------------------------------------------------

def load_trainable(model: nn.Module, checkpoint: Path) -> None:
    """Copy model.safetensors into the model's trainable parameters; the names must match
    exactly (a checkpoint of another stage's trainable groups is a `model.ckpt`, not a resume)."""
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
            params[name].copy_(tensor)


def load_resume_state(accelerator: Accelerator, model: nn.Module, loader, checkpoint: Path) -> dict:
    """Restore weights, optimiser, scaler, RNGs and data position; returns the checkpoint's meta."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    if not (checkpoint / RESUME_DIR).is_dir():
        raise ResumeError(f"{checkpoint} holds weights only (no {RESUME_DIR}/): it can start a new stage "
                         f"as model.ckpt but cannot be resumed")
    if meta.get("world_size", 1) != accelerator.num_processes:
        raise ResumeError(f"{checkpoint} was written by {meta.get('world_size', 1)} processes; resume it with "
                         f"the same number (now {accelerator.num_processes}) so every data shard continues "
                         f"where it stopped")
    load_trainable(accelerator.unwrap_model(model), checkpoint)
    accelerator.load_state(str(checkpoint / RESUME_DIR))
    data_state = torch.load(checkpoint / RESUME_DIR / f"data_rank{accelerator.process_index}.pt", weights_only=True)
    loader.load_state_dict(data_state)
    return meta
