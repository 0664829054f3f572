"""FSDP2 sharding of TinyGPTV (training/distributed.shard_fsdp2) in this process, on a one-process
gloo group: which parts are sharded or replicated, the same loss and gradients as the unsharded
model, and a half-precision frozen LLM with fp32 trainable norms and LoRA under bf16 mixed
precision and gradient checkpointing. The two-process runs are in test_distributed_runs.py."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model_section
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from tinygpt_v.models import build_model
from tinygpt_v.training.distributed import copy_into, full_tensor, shard_fsdp2
from tinygpt_v.training.trainer import enable_gradient_checkpointing

BATCH = {"image": None, "prompt": [["<ImageHere> what colour?"], ["<ImageHere> which shape?"]],
         "answer": [["red"], ["a small square"]]}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_model_section(**{"vision.image_size": 28, "lora.dropout": 0.0, **overrides}),
                        verbose=False)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 28, 28)
    return model, {**BATCH, "image": images}


def loss_and_grads(model, batch, autocast: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(batch)["loss"]
    loss.backward()
    grads = {n: full_tensor(p.grad).float() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_decoder_layers_sharded_frozen_towers_replicated_and_same_gradients():
    plain, batch = tiny()
    sharded, _ = tiny()
    shard_fsdp2(sharded, torch.device("cpu"))
    llm = sharded.llm.get_base_model()
    assert all(isinstance(layer, FSDPModule) for layer in llm.get_decoder().layers)
    assert isinstance(sharded.connector, FSDPModule)  # trainable part outside the decoder: its own unit
    params = dict(sharded.named_parameters())
    assert not any(isinstance(p, DTensor) for p in sharded.vision.parameters())  # frozen: replicated
    assert not isinstance(llm.get_input_embeddings().weight, DTensor)
    assert all(isinstance(p, DTensor) for p in params.values() if p.requires_grad)

    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(sharded, batch)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert set(grads_a) == set(grads_b)
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) <= 1e-6
    assert any(g.abs().sum() > 0 for n, g in grads_b.items() if ".lora_B." not in n)


def test_weights_load_into_shards_and_gather_back():
    model, _ = tiny()
    shard_fsdp2(model, torch.device("cpu"))
    name = next(n for n, p in model.named_parameters() if ".lora_A." in n)
    param = dict(model.named_parameters())[name]
    value = torch.arange(param.numel(), dtype=torch.float32).reshape(param.shape)
    with torch.no_grad():
        copy_into(param, value)
    assert torch.equal(full_tensor(param.detach()), value)


def test_half_precision_llm_with_fp32_norms_and_lora_under_bf16_and_gradient_checkpointing():
    """A frozen bf16 LLM whose trainable norms and LoRA are fp32: one shard unit per layer holds
    both dtypes (FSDP2 needs only the trainable ones to agree), bf16 compute, fp32 gradients."""
    model, batch = tiny(**{"llm.dtype": "bf16"})
    enable_gradient_checkpointing(model)
    shard_fsdp2(model, torch.device("cpu"), mixed_precision="bf16")
    layer = model.llm.get_base_model().get_decoder().layers[0]
    dtypes = {p.dtype for p in layer.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}
    assert model.llm.get_base_model().is_gradient_checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lora = next(p for n, p in model.named_parameters() if ".lora_A." in n)
    before = full_tensor(lora.detach()).clone()
    loss, grads = loss_and_grads(model, batch, autocast=True)
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    optimizer.step()
    after = full_tensor(lora.detach())
    assert after.dtype == torch.float32 and not torch.equal(before, after)
