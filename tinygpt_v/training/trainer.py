"""The training loop: one process or many (torchrun / accelerate launch), through accelerate.

    Trainer(cfg).fit()  ->  path of checkpoint_final

A step is one optimiser update: `accum_grad_iters` micro-batches per process, each one batch
of one dataset from the mixed loader. Before every backward the loss is summed over the
processes, so a NaN/inf anywhere stops every process at the same step, before anything is
written. Each process's loss is weighted by its share of the step's target tokens, so the
gradient DDP averages is the mean over every target token of the global batch: N processes
with batch B train exactly like one process with batch N x B.

How the processes share the work (DDP, FSDP2, DeepSpeed ZeRO) is settled before anything else
(distributed.py), checked once accelerate has started, and printed; a run that is not what the
config and the launcher ask for stops there. Then the main process locks the output folder (lock.py: a second run on
it refuses) and the data is built before the model, so a missing file costs seconds. A resume
is exact or refused (checkpointing.checkpoint_problems); see `run_schema` for `resume_inexact`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from ..config import to_plain
from .distributed import (accelerator_kwargs, check_started, describe, full_tensor, model_built_whole,
                          peak_memory_gib, plan_run, shard_fsdp2)
from .checkpointing import (FINAL, ResumeError, check_same_run, checkpoint_problems,
                            exclude_model_from_accelerate_state, latest_checkpoint, list_checkpoints, load_resume_state,
                            prune_checkpoints, read_meta, save_checkpoint, set_aside, unreadable_checkpoints)
from .feature_cache import setup_input_pipeline
from .lock import OutputDirLock
from .preflight import check_built_datasets, check_training_config
from .optim import build_optimizer
from .schedules import StepScheduler, build_schedule
from .settings import read_run_settings
from .tracking import (CURVES_FILE, MetricsLog, Progress, flat_config, format_seconds, plot_curves,
                       tracker_init_kwargs, tracker_names)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stopped before updating or saving."""


@dataclass
class StepResult:
    loss: float              # mean over the step's target tokens, all processes
    tokens: int              # tokens processed in the step, all processes
    grad_norm: float | None  # before clipping


class Trainer:
    def __init__(self, cfg):
        self.config = to_plain(cfg)
        self.run = read_run_settings(cfg.get("run"))
        self.output_dir = Path(self.run.output_dir)
        check_training_config(self.config)  # again: a config built in code skipped load_config
        if self.run.cpu_threads:
            torch.set_num_threads(self.run.cpu_threads)
        self.plan = plan_run(self.run, self.config.get("datasets"))
        self.accelerator = self._make_accelerator()
        check_started(self.accelerator, self.plan)
        self.accelerator.print(describe(self.accelerator, self.plan, self.run.accum_grad_iters), flush=True)
        # one run per output folder; the main process holds the lock for the whole run
        self.lock = OutputDirLock(self.output_dir)
        if self.accelerator.is_main_process:
            self.lock.acquire()
        self.loader = None
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise
        self.step = 0
        self.metrics = MetricsLog(self.output_dir, enabled=self.accelerator.is_main_process)

    def _build(self, cfg) -> None:
        from ..data import build_train_loader  # heavy imports only when a run starts
        from ..models import build_model
        exclude_model_from_accelerate_state(self.accelerator)
        # the data first: a missing file or shard is reported before the model (minutes for the
        # real one) is built. The loader draws nothing from the global RNGs, so the order does not
        # change the initial weights.
        self.loader = build_train_loader(cfg.datasets, seed=self.run.seed, rank=self.accelerator.process_index,
                                         world_size=self.accelerator.num_processes, num_workers=self.run.num_workers,
                                         prefetch=self.run.prefetch, device=self.accelerator.device)
        check_built_datasets(self.config["model"], self.loader.datasets)
        set_seed(self.run.seed)  # the same on every process: identical initial weights
        with model_built_whole(self.accelerator):  # not inside DeepSpeed's zero.Init
            model = build_model(cfg.model, verbose=self.accelerator.is_main_process)
        self.feature_cache = setup_input_pipeline(  # tokenise in the loader; run.feature_cache
            self.loader, model, self.run, list(self.config["model"].get("trainable", ["projection"])),
            num_processes=self.accelerator.num_processes, is_main_process=self.accelerator.is_main_process)
        if self.run.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.sharded:
            # FSDP2 is ours (distributed.py): the model is sharded here, not wrapped by accelerate, and
            # the optimiser over the shards stays ours too (accelerate would save rank 0's shard only)
            distributed = self.run.distributed or {}
            self.model = shard_fsdp2(model, self.accelerator.device, self.run.mixed_precision,
                                     distributed.get("reshard_after_forward", True))
            self.optimizer = build_optimizer(self.model, self.run.init_lr, self.run.weight_decay, self.run.beta2)
        else:
            optimizer = build_optimizer(model, self.run.init_lr, self.run.weight_decay, self.run.beta2)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = StepScheduler(self.optimizer, build_schedule(self.run))
        set_seed(self.run.seed, device_specific=True)  # seed + rank from here on, as the original

    @property
    def sharded(self) -> bool:
        """FSDP2: the model is sharded by the trainer (distributed.shard_fsdp2)."""
        return self.plan.mode == "fsdp2"

    def close(self) -> None:
        """Stop the data workers and let the output folder go (idempotent)."""
        if self.loader is not None:
            self.loader.close()
        self.lock.release()

    def _make_accelerator(self) -> Accelerator:
        # accelerate keeps its settings in process-wide singletons; a second run in the same
        # process (a pipeline's next stage, a test) starts from fresh ones, keeping the process group
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        run = self.run
        extra = accelerator_kwargs(self.plan, run)
        handlers = extra.pop("kwargs_handlers", [])
        return Accelerator(
            **extra,
            mixed_precision=run.mixed_precision,
            gradient_accumulation_steps=run.accum_grad_iters,
            log_with=tracker_names(run) or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "tensorboard")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=run.find_unused_parameters),
                             *handlers],
        )

    # --- the run -------------------------------------------------------------------------------

    def fit(self) -> Path:
        try:
            self.step = self._resume()
            last = self.run.last_step
            if self.step >= last:
                self.accelerator.print(f"{self.output_dir}: already trained to step {self.step} of {last}; "
                                       f"nothing to do")
                return latest_checkpoint(self.output_dir)
            start_step, started = self.step, time.perf_counter()
            self._start_logging()
            try:
                self._loop(last)
                final = self._save(FINAL)
                peak = self.accelerator.gather(torch.tensor([peak_memory_gib(self.accelerator.device)],
                                                            device=self.accelerator.device)).max().item()
            finally:
                self.progress.close()
                self.accelerator.end_training()
        finally:
            self.close()
        self._finish(start_step, time.perf_counter() - started, final, peak)
        return final

    def _loop(self, last: int) -> None:
        window: list[float] = []
        for step in range(self.step, last):
            lr = self.scheduler.set_step(step)
            result = self.train_step(step)
            self.step = step + 1
            window.append(result.loss)
            self._record(result, lr)
            if self.step % self.run.log_every == 0 or self.step == last:
                self._log_window(window, lr, result)
                window = []
            if self.step % self.run.checkpoint_every == 0 and self.step < last:
                self._save(f"checkpoint_{self.step}")

    def train_step(self, step: int) -> StepResult:
        """One optimiser update over accum_grad_iters micro-batches."""
        losses, tokens, grad_norm = [], 0, None
        for micro in range(self.run.accum_grad_iters):
            batch = next(self.loader)
            with self.accelerator.accumulate(self.model), self._autocast():
                out = self.model(self.feature_cache.fill(batch) if self.feature_cache else batch)
                loss, weight, step_tokens = self._global_loss(out)
                if not math.isfinite(loss):
                    raise self._non_finite_loss(step, micro, batch, out["loss"])
                self.accelerator.backward(out["loss"] * weight)
                if self.accelerator.sync_gradients:
                    grad_norm = self._clip_gradients(step)
                if self.accelerator.sync_gradients:  # (accelerate's wrapped optimiser checks it too)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            tokens += step_tokens
        return StepResult(sum(losses) / len(losses), tokens, grad_norm)

    def _autocast(self):
        """Mixed precision for the forward: accelerate's prepared model has it built in; the
        sharded one computes its units in the policy's dtype, and the replicated towers here."""
        import contextlib
        return self.accelerator.autocast() if self.sharded else contextlib.nullcontext()

    def _global_loss(self, out: dict) -> tuple[float, float, int]:
        """(loss over all processes' target tokens, this process's loss weight, all tokens)."""
        targets = out["num_target_tokens"]
        local = torch.tensor([out["loss"].detach().double().item() * targets, targets, out["num_tokens"]],
                             dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(local, "sum") if self.accelerator.num_processes > 1 else local
        loss_sum, all_targets, all_tokens = total.tolist()
        if not math.isfinite(loss_sum):
            return loss_sum, 0.0, int(all_tokens)
        weight = targets * self.accelerator.num_processes / all_targets if all_targets else 1.0
        return loss_sum / max(all_targets, 1), weight, int(all_tokens)

    def _clip_gradients(self, step: int) -> float | None:
        """Clip to max_grad_norm (or only measure, when null); returns the norm before clipping."""
        if self.run.max_grad_norm is None and (step + 1) % self.run.log_every:
            return None  # no clipping: the norm (a host sync) is measured only on logged steps
        max_norm = self.run.max_grad_norm or math.inf
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(trainable, max_norm)
        if norm is None:  # DeepSpeed clips inside its own step
            return None
        norm = float(full_tensor(norm))  # FSDP2: the norm of sharded gradients is itself sharded
        # with an fp16 GradScaler an inf norm is routine: the scaler skips that update
        if not math.isfinite(norm) and self.accelerator.scaler is None:
            raise NonFiniteLossError(f"step {step + 1}: the gradient norm is {norm} although the loss was finite; "
                                     f"stopped before the update, nothing was saved. The last checkpoint in "
                                     f"{self.output_dir} is intact.")
        return norm

    def _non_finite_loss(self, step: int, micro: int, batch: dict, local_loss: torch.Tensor) -> NonFiniteLossError:
        value = float(local_loss.detach())
        here = not math.isfinite(value)
        where = (f"dataset {batch['dataset'][0]!r}, sample ids {batch['id']}" if here
                 else "on another process (see its message)")
        rank = f", process {self.accelerator.process_index}" if self.accelerator.num_processes > 1 else ""
        return NonFiniteLossError(
            f"loss is {value if here else 'non-finite'} at step {step + 1} (micro-batch {micro + 1} of "
            f"{self.run.accum_grad_iters}{rank}): {where}. Stopped before the update; nothing was saved, the last "
            f"checkpoint in {self.output_dir} is intact.")

    # --- checkpoints ---------------------------------------------------------------------------

    def _resume(self) -> int:
        resume = self.run.resume
        if resume is None:
            found = latest_checkpoint(self.output_dir)
            if found is not None:
                raise FileExistsError(f"{self.output_dir} already holds {found.name}: continue it with "
                                      f"--options run.resume=auto, or choose another run.output_dir")
            return 0
        if resume == "auto":
            for message in unreadable_checkpoints(self.output_dir):
                self._warn(f"{message}; not used as a checkpoint")
            candidates = [folder for _, folder in reversed(list_checkpoints(self.output_dir))]
            if not candidates:
                self.accelerator.print(f"run.resume=auto: no checkpoint in {self.output_dir} yet, starting at step 0")
                return 0
        else:
            candidates = [Path(resume)]
        checkpoint, missing = self._choose_checkpoint(candidates, auto=resume == "auto")
        meta = load_resume_state(self.accelerator, self.model, self.loader, checkpoint, missing, self.optimizer,
                                 mode=self.plan.mode)
        exact = "" if not missing else " (inexact: run.resume_inexact)"
        self.accelerator.print(f"resumed from {checkpoint} at step {meta['step']}{exact}")
        return int(meta["step"])

    def _choose_checkpoint(self, candidates: list[Path], auto: bool) -> tuple[Path, list[Path]]:
        """The newest candidate that resumes exactly, or (run.resume_inexact) whose weights are
        whole; with `auto`, damaged newer ones are warned about and set aside. Returns the
        checkpoint and its resume-state files to do without."""
        plain = self.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                          DistributedType.MEGATRON_LM)
        damaged, reports = [], []
        for checkpoint in candidates:
            problems = checkpoint_problems(checkpoint, optimizer=plain, scaler=self.accelerator.scaler is not None)
            if not any(p.essential for p in problems):
                check_same_run(self.accelerator, self.model, checkpoint, read_meta(checkpoint), self.plan.mode)
                if not problems or self.run.resume_inexact:
                    for problem in problems:
                        self._warn(f"{problem}; run.resume_inexact is set, so the run goes on without it "
                                   f"(not bit-identical to an uninterrupted run)")
                    self._set_aside(damaged, checkpoint)
                    return checkpoint, [p.file for p in problems]
            reports.append(_problem_report(checkpoint, problems))
            if not auto:
                raise ResumeError(reports[-1] + _resume_hint(problems, auto=False))
            self._warn(f"{reports[-1]}; trying the checkpoint before it")
            damaged.append(checkpoint)
        newest = checkpoint_problems(candidates[0], optimizer=plain, scaler=self.accelerator.scaler is not None)
        raise ResumeError(f"no checkpoint in {self.output_dir} can be resumed: {'; '.join(reports)}"
                          + _resume_hint(newest, auto=True))

    def _set_aside(self, damaged: list[Path], chosen: Path) -> None:
        """Damaged checkpoints newer than the one resumed would be kept by `keep_last` pruning in
        place of good ones: hide them (renamed, not deleted)."""
        if not damaged:
            return
        self.accelerator.wait_for_everyone()  # every process has read them before they move
        if self.accelerator.is_main_process:
            for folder in damaged:
                hidden = set_aside(folder)
                self._warn(f"resuming from {chosen.name}; the damaged {folder.name} was moved to {hidden.name}")
        self.accelerator.wait_for_everyone()

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _save(self, name: str) -> Path:
        meta = {"step": self.step, "epoch": self.step // self.run.iters_per_epoch, "config": self.config,
                "world_size": self.accelerator.num_processes, "distributed": self.plan.mode}
        path = save_checkpoint(self.accelerator, self.model, self.loader, self.output_dir, name, meta,
                               optimizer=self.optimizer if self.sharded else None)
        if self.accelerator.is_main_process and name != FINAL:
            prune_checkpoints(self.output_dir, self.run.keep_last)
        return path

    # --- reporting -----------------------------------------------------------------------------

    def _start_logging(self) -> None:
        main = self.accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics.start(resumed_step=self.step)
        if self.accelerator.log_with:
            self.accelerator.init_trackers(self.run.project, config=flat_config(self.config),
                                           init_kwargs=tracker_init_kwargs(self.run, self.output_dir))
        self.progress = Progress(self.step, self.run.last_step, self.run.job_name or self.output_dir.name, main)
        self.run_started = time.time()

    def _record(self, result: StepResult, lr: float) -> None:
        self.metrics.append({"step": self.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                             "tokens": result.tokens, "time": round(time.time() - self.run_started, 3)})
        self.progress.update(result.tokens)

    def _log_window(self, window: list[float], lr: float, result: StepResult) -> None:
        mean_loss = sum(window) / len(window)
        tokens_per_s = self.progress.show(mean_loss, lr)
        values = {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                  "train/epoch": self.step / self.run.iters_per_epoch}
        if result.grad_norm is not None:
            values["train/grad_norm"] = result.grad_norm
        self.accelerator.log(values, step=self.step)

    def _finish(self, start_step: int, seconds: float, final: Path, peak_gib: float) -> None:
        if not self.accelerator.is_main_process:
            return
        records = self.metrics.read()
        curves = plot_curves(records, self.output_dir / CURVES_FILE, title=self.run.job_name or str(self.output_dir))
        run_records = [r for r in records if r["step"] > start_step]
        steps = len(run_records)
        tokens = sum(r["tokens"] for r in run_records)
        tail = run_records[-max(1, min(self.run.log_every, steps)):]
        final_loss = sum(r["loss"] for r in tail) / max(len(tail), 1)
        print(f"done: steps {start_step}->{self.step} in {format_seconds(seconds)} "
              f"({steps / max(seconds, 1e-9):.2f} steps/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s); "
              f"final loss {final_loss:.4f} (mean of last {len(tail)} steps); checkpoint {final}; curves {curves}",
              flush=True)
        for line in getattr(self.loader, "health_summary", list)():  # samples used / skipped per dataset
            print(line, flush=True)
        memory = "GPU memory allocated" if self.accelerator.device.type == "cuda" else "resident memory"
        print(f"peak {memory}: {peak_gib:.2f} GiB per process (the largest of {self.accelerator.num_processes}); "
              f"{describe(self.accelerator, self.plan, self.run.accum_grad_iters)}", flush=True)


def _problem_report(checkpoint: Path, problems) -> str:
    return f"{checkpoint} cannot be resumed exactly: " + "; ".join(str(p) for p in problems)


def _resume_hint(problems, auto: bool) -> str:
    if any(p.essential for p in problems):
        return (". Its weights or description are damaged: resume an earlier checkpoint (run.resume=<folder>), "
                "or move this one out of the output folder")
    where = "the newest one" if auto else "it"
    return (f". Restore the file(s), or set run.resume_inexact: true to continue from {where} without them "
            f"(the run is then not bit-identical to an uninterrupted one)")


def enable_gradient_checkpointing(model) -> None:
    """Recompute the LLM's activations in backward (the frozen vision tower keeps none anyway).

    Non-reentrant checkpointing needs no input that requires grad, so transformers' hook that
    marks the embedding output as requiring grad is removed again: it would turn the embeddings
    into a leaf that the image splice cannot write into."""
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    enable = getattr(llm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # transformers < 5
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm.disable_input_require_grads()
    llm.config.use_cache = False


def train(cfg) -> Path:
    """Train the config's stage; returns its final checkpoint folder."""
    return Trainer(cfg).fit()
