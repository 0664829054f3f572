"""Checkpoint compatibility: the original project's files, LAVIS / Hugging Face BLIP-2, Phi-2 in
both layouts, and our own formats.

    load_checkpoints(model, paths)        model.ckpt: ours, original .pth, BLIP-2, EVA, Phi-2
    load_eva_vit_g(eva, path)             vision.pretrained (LAVIS file or HF BLIP-2 folder)
    load_blip2_qformer(qformer, path)     qformer.pretrained (LAVIS file or HF BLIP-2 folder)
    load_ln_vision(ln_vision, path)       BLIP-2's ln_vision from the same source as the Q-Former
    save_trainable(model, path)           trainer checkpoints (trainable parameters)
    save_original(model, path)            the same under the original's names, as its runner writes them
    save_pretrained / from_pretrained     self-contained export folder
Every loader returns a LoadReport and raises CheckpointError, leaving the model untouched, when
a file is unreadable or does not fit. Key tables: keymaps.py.
"""
from .export import (convert_fused_phi, convert_fused_phi_state, convert_to_ours, export_config, from_pretrained,
                     convert_to_original, save_original, save_pretrained,
                     save_trainable)
from .files import CheckpointError, read_state_dict, save_safetensors_atomic
from .keymaps import TABLES, KeyTable, canonical
from .loading import (LoadReport, load_blip2_qformer, load_checkpoints, load_eva_vit_g, load_into, load_ln_vision,
                      plan_load)

__all__ = [
    "CheckpointError", "LoadReport", "KeyTable", "TABLES", "canonical",
    "load_checkpoints", "load_eva_vit_g", "load_blip2_qformer", "load_ln_vision", "load_into", "plan_load",
    "read_state_dict", "save_safetensors_atomic", "save_trainable", "save_pretrained", "from_pretrained",
    "export_config", "convert_to_ours", "convert_fused_phi", "convert_fused_phi_state", "save_original",
    "convert_to_original",
]
