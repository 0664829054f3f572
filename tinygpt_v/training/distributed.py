"""What a training run is distributed over: chosen once at start, checked, said, never downgraded.

`run.distributed.mode` picks the strategy (the launcher starts the processes, the YAML says
what they do):

    auto    follow the launcher: accelerate's FSDP v2 config -> fsdp2, its DeepSpeed config ->
            zero{stage}, anything else (torchrun, accelerate's multi-GPU/CPU config, one
            process) -> ddp
    ddp     data parallel (accelerate's DistributedDataParallel); one process: plain training
    fsdp2   `torch.distributed.fsdp.fully_shard` of the LLM's decoder layers, done here (see
            `shard_fsdp2`), on GPU (nccl) or CPU (gloo)
    zero2, zero3   DeepSpeed ZeRO through accelerate (GPUs only), with a generated DeepSpeed
            config: no JSON needed (a JSON named by accelerate's config is used, its "auto"
            micro-batch filled in)

Before the Accelerator is built, `plan_run` reads the launcher's environment (WORLD_SIZE,
LOCAL_WORLD_SIZE, accelerate launch's ACCELERATE_USE_FSDP / FSDP_VERSION /
ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_ZERO_STAGE) and settles the mode and the device:
under a launcher without a GPU, `run.device: auto` trains on CPU with gloo (accelerate alone
would make each process a separate single-process run). After it is built,
`check_started` refuses a run whose world size or strategy is not the one asked for, with one
line saying why and what to change. `describe` is the line the trainer prints at start.

Why FSDP2 is done here and not by accelerate's FSDP plugin: accelerate builds FSDP only on
accelerator devices (on CPU it silently trains plain DDP), and its FSDP2 path shards the whole
model at the root. Here the frozen towers (vision, Q-Former when frozen, the LLM's frozen
embeddings and head) stay replicated, each decoder layer is one shard unit, and every
trainable parameter is in a unit (a trainable part outside the decoder gets its own), which is
checked. Units may mix dtypes (a half-precision frozen layer with fp32 trainable norms and
LoRA): FSDP2 only requires the *trainable* parameters of a unit to share one dtype, and ours
are all fp32 (models.parameters keeps trainable parameters in fp32).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

MODES = ("auto", "ddp", "fsdp2", "zero2", "zero3")
CONFIGS = "configs/accelerate"
FSDP_TAKEN_OVER = "TINYGPT_V_LAUNCHED_FSDP_VERSION"  # see accelerator_kwargs


def distributed_schema(mode: Literal["auto", "ddp", "fsdp2", "zero2", "zero3"] = "auto",
                       reshard_after_forward: bool = True) -> None:
    """The `run.distributed` section.

    `mode`: see the module docstring. `reshard_after_forward` (fsdp2): free each layer's gathered
    weights after its forward and gather them again in backward (less memory, more traffic)."""


class DistributedSetupError(RuntimeError):
    """The processes are not distributed the way the config and the launcher ask; nothing ran."""


@dataclass(frozen=True)
class Launcher:
    """What the launcher's environment says about this process."""
    world_size: int | None        # WORLD_SIZE: set by torchrun / accelerate launch / deepspeed; None: no launcher
    local_world_size: int | None  # LOCAL_WORLD_SIZE: processes on this node
    accelerate_mode: str | None   # accelerate launch's strategy: "fsdp1", "fsdp2", "zero<N>" or None

    @property
    def nodes(self) -> int:
        if not self.world_size or not self.local_world_size:
            return 1
        return max(1, self.world_size // self.local_world_size)


def read_launcher(env: Mapping[str, str] = os.environ) -> Launcher:
    def number(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.strip().isdigit() else None

    mode = None
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        mode = f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
            mode = f"zero{_zero_stage_of_json(env['ACCELERATE_DEEPSPEED_CONFIG_FILE'])}"
    elif env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        mode = f"fsdp{env.get('FSDP_VERSION', '1')}"
    elif env.get(FSDP_TAKEN_OVER):  # an earlier stage of this process took accelerate's FSDP over
        mode = f"fsdp{env[FSDP_TAKEN_OVER]}"
    return Launcher(number("WORLD_SIZE"), number("LOCAL_WORLD_SIZE"), mode)


def _zero_stage_of_json(path: str) -> int:
    import json
    try:
        return int(json.loads(open(path, encoding="utf-8").read()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, AttributeError) as e:
        raise DistributedSetupError(f"{path} (accelerate's deepspeed_config_file): unreadable ({e})") from None


def resolve_mode(requested: str, launcher: Launcher) -> str:
    """The strategy this run uses: run.distributed.mode, or the launcher's when `auto`; a
    disagreement between the two is an error, never a silent choice."""
    launched = launcher.accelerate_mode
    if launched == "fsdp1":
        raise DistributedSetupError(
            "accelerate's config asks for FSDP version 1, which this trainer does not run: set "
            f"`fsdp_version: 2` in it (see {CONFIGS}/fsdp2.yaml) or use run.distributed.mode: fsdp2")
    if launched in ("zero0", "zero1"):
        raise DistributedSetupError(
            f"accelerate's DeepSpeed config asks for ZeRO stage {launched[-1]}; this trainer runs stages 2 and 3: "
            f"set `zero_stage: 2` or `3` (see {CONFIGS}/zero2.yaml) or launch with torchrun for DDP")
    if launched not in (None, "fsdp2", "zero2", "zero3"):
        raise DistributedSetupError(f"accelerate's config asks for an unknown strategy ({launched})")
    if requested == "auto":
        return launched or "ddp"
    if launched is not None and launched != requested:
        raise DistributedSetupError(
            f"run.distributed.mode is {requested} but accelerate's config asks for {launched}: make them agree "
            f"(accelerate launch --config_file {CONFIGS}/{requested}.yaml, or run.distributed.mode: auto to follow "
            f"the launcher)")
    return requested


@dataclass(frozen=True)
class Plan:
    """Settled before the Accelerator is built."""
    mode: str
    cpu: bool              # Accelerator(cpu=...)
    cuda: bool             # a GPU is visible
    launcher: Launcher
    micro_batch: int       # per process and micro-batch (the largest dataset batch of the mix)


def plan_run(run, datasets: Mapping | None, env: Mapping[str, str] = os.environ,
             cuda: bool | None = None) -> Plan:
    """Mode and device from the run settings and the launcher, refusing combinations that
    cannot work (checked before anything heavy is built)."""
    launcher = read_launcher(env)
    settings = dict(run.distributed or {})
    mode = resolve_mode(settings.get("mode", "auto"), launcher)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    launched = (launcher.world_size or 1) > 1
    # device auto without a GPU under a launcher: CPU with gloo. Left to accelerate, a process
    # without an accelerator device is a single-process run, N of them into one folder.
    cpu = run.device == "cpu" or (launched and not cuda)
    if mode in ("zero2", "zero3"):
        if run.device == "cpu":
            raise DistributedSetupError(
                f"run.distributed.mode {mode} (DeepSpeed through accelerate) cannot run with run.device: cpu "
                f"(accelerate then leaves DeepSpeed out): set run.device: auto (DeepSpeed's CPU accelerator is "
                f"used when no GPU is visible), or use mode fsdp2 / ddp on CPU")
        cpu = False  # DeepSpeed places the model itself
    if mode == "fsdp2" and run.mixed_precision == "fp16":
        raise DistributedSetupError(
            "run.distributed.mode fsdp2 with run.mixed_precision fp16 would need a sharded gradient scaler: use "
            "mixed_precision bf16 (or no)")
    if env.get("ACCELERATE_USE_CPU", "false").lower() == "true" and run.device != "cpu" and cuda:
        raise DistributedSetupError("accelerate's config says use_cpu but run.device is auto and a GPU is visible: "
                                    "set run.device: cpu, or drop use_cpu from the accelerate config")
    return Plan(mode, cpu, cuda, launcher, micro_batch_size(datasets))


def micro_batch_size(datasets: Mapping | None) -> int:
    sizes = [int(options["batch_size"]) for options in (datasets or {}).values()
             if isinstance(options, Mapping) and "batch_size" in options]
    return max(sizes, default=1)


# --- accelerate ---------------------------------------------------------------------------------

def accelerator_kwargs(plan: Plan, run) -> dict:
    """Arguments for Accelerator beyond the common ones: the CPU switch and, for ZeRO, a
    DeepSpeed plugin with its micro-batch filled in."""
    kwargs = {"cpu": plan.cpu}
    if plan.mode == "fsdp2" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # the sharding is ours (shard_fsdp2); accelerate's own FSDP, which accelerate launch's FSDP
        # config switches on through this variable (read again at every clip), would wrap the model
        # a second time. The launcher's request stays readable for the next stage of a pipeline.
        os.environ[FSDP_TAKEN_OVER] = os.environ.get("FSDP_VERSION", "1")
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    if plan.mode in ("zero2", "zero3"):
        kwargs["deepspeed_plugin"] = deepspeed_plugin(plan, run)
        if not plan.cuda:  # DeepSpeed's CPU accelerator; accelerate would pick no backend at all
            from accelerate import InitProcessGroupKwargs
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kwargs


def deepspeed_config(plan: Plan, run, launched_config: dict | None = None) -> dict:
    """The DeepSpeed settings the trainer owns, over accelerate's generated (or the user's) config:
    the micro-batch (accelerate would otherwise need the loader handed over), accumulation,
    clipping, and on ZeRO-3 gathering the weights for saving."""
    config = dict(launched_config or {})
    stage = int(plan.mode[-1])
    zero = dict(config.get("zero_optimization") or {})
    if zero.get("stage", stage) != stage:
        raise DistributedSetupError(f"the DeepSpeed config sets zero_optimization.stage {zero['stage']} but "
                                    f"run.distributed.mode is {plan.mode}")
    zero["stage"] = stage
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config["zero_optimization"] = zero
    for key, value in (("train_micro_batch_size_per_gpu", plan.micro_batch),
                       ("gradient_accumulation_steps", run.accum_grad_iters)):
        if config.get(key, "auto") not in ("auto", value):
            raise DistributedSetupError(f"the DeepSpeed config sets {key} {config[key]} but the training config "
                                        f"gives {value}: remove it from the JSON (the trainer fills it in)")
        config[key] = value
    config["gradient_clipping"] = run.max_grad_norm or 0.0  # 0: no clipping, as the original
    config.setdefault("train_batch_size", "auto")
    return config


def deepspeed_plugin(plan: Plan, run):
    from accelerate.utils import DeepSpeedPlugin
    # zero3_init_flag off: the model is built whole (see model_built_whole)
    plugin = DeepSpeedPlugin(zero_stage=int(plan.mode[-1]), gradient_accumulation_steps=run.accum_grad_iters,
                             zero3_save_16bit_model=True, zero3_init_flag=False)
    config = deepspeed_config(plan, run, plugin.deepspeed_config)
    plugin.deepspeed_config.clear()
    plugin.deepspeed_config.update(config)
    plugin.gradient_clipping = config["gradient_clipping"]
    return plugin


@contextmanager
def model_built_whole(accelerator):
    """Build the model outside `deepspeed.zero.Init`: with a ZeRO-3 config registered,
    transformers would create the LLM already partitioned (its random init drawn differently
    from every other mode, and partitioned before our post-norm / fused-q/k/v / LoRA surgery).
    The engine partitions the whole model afterwards; the cost is one full copy per process
    while it is built."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # as accelerate left it (transformers' generate reads it)


def check_started(accelerator, plan: Plan) -> None:
    """Refuse, on every process, a run that is not distributed as asked."""
    from accelerate.utils import DistributedType
    launched, got = plan.launcher.world_size, accelerator.num_processes
    if launched is not None and launched != got:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate runs this one as "
            f"{got} of {got} ({accelerator.distributed_type}): each would train alone into one output folder. Fix: "
            f"run.device: cpu to train on CPU (gloo), or make the GPUs visible to every process")
    kind = accelerator.distributed_type
    if plan.mode in ("zero2", "zero3"):
        stage = getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", None)
        if kind != DistributedType.DEEPSPEED or stage != int(plan.mode[-1]):
            raise DistributedSetupError(
                f"run.distributed.mode {plan.mode} asked for DeepSpeed ZeRO-{plan.mode[-1]} but accelerate set up "
                f"{kind}{f' ZeRO-{stage}' if stage is not None else ''}: launch with accelerate launch "
                f"--config_file {CONFIGS}/{plan.mode}.yaml on GPUs")
    elif kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise DistributedSetupError(f"run.distributed.mode {plan.mode} but accelerate set up {kind}: "
                                    f"use the matching config in {CONFIGS}/")


def describe(accelerator, plan: Plan, accum: int) -> str:
    """One line: what this run is distributed over."""
    n = accelerator.num_processes
    backend = accelerator.state.backend or "none"
    strategy = {"ddp": "DDP" if n > 1 else "single process", "fsdp2": "FSDP2 (decoder layers sharded, "
                "frozen towers replicated)", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[plan.mode]
    nodes = plan.launcher.nodes
    return (f"distributed: {strategy} | backend {backend} | device {accelerator.device.type} | world size {n} "
            f"({nodes} node{'s' if nodes > 1 else ''}) | per-process batch {plan.micro_batch} x accum {accum} "
            f"= global batch {plan.micro_batch * accum * n}")


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory: allocated on the GPU, or resident (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --- FSDP2 ----------------------------------------------------------------------------------------

def shard_fsdp2(model: nn.Module, device: torch.device, mixed_precision: str = "no",
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (a TinyGPTV) over all processes with FSDP2, in place.

    Units: each decoder layer; the decoder (its remaining parameters: the final norm); and any
    other part that trains (connector, a trainable Q-Former, embeddings, head). Frozen parts
    outside the decoder layers stay replicated: nothing to reduce, and they are called outside
    the decoder's forward (the image encoder, the token embedding, the target-only head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard_after_forward}
    causal_lm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    decoder = causal_lm.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, **options)
    replicated = []
    for part in _outside_parts(model, causal_lm, decoder):
        if any(p.requires_grad for p in part.parameters()):
            fully_shard(part, **options)
        else:
            replicated.append(part)
    ignored = {p for part in replicated for p in part.parameters()}
    fully_shard(decoder, ignored_params=ignored, **options)
    _check_every_trainable_sharded(model)
    return model


def _outside_parts(model: nn.Module, causal_lm: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """The modules called outside the decoder's forward: TinyGPTV's other parts, the token
    embedding (inside the decoder module, but called by the image splice), the LM head."""
    parts = [child for name, child in model.named_children() if name != "llm" and child is not None]
    return parts + [decoder.get_input_embeddings(), causal_lm.get_output_embeddings()]


def _check_every_trainable_sharded(model: nn.Module) -> None:
    from torch.distributed.tensor import DTensor
    plain = [name for name, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if plain:
        raise DistributedSetupError(f"fsdp2: trainable parameters outside every shard unit (their gradients "
                                    f"would not be reduced): {plain[:5]}")


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to the whole tensor (collective); other tensors as they are."""
    from torch.distributed.tensor import DTensor
    return value.full_tensor() if isinstance(value, DTensor) else value


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value) for a plain or sharded parameter (each process loads the whole value
    and keeps its own shard: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimiser's state, unsharded, keyed by parameter name (collective; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Each process gives the whole state and keeps its shards (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
