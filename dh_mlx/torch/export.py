"""Deployment export: `torch.export` of the logits forward, and the HF-named tensors back out of the artifact.

The artifact is one `.pt2` file (torch.export.save) holding the graph, the weights and our config.json as
an extra file, so an importer needs nothing else to rebuild a checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..files import write_atomic
from .model import Model
from .moe import grouped_mm_available
from .weights import to_file_layout

CONFIG_FILE = "config.json"


def export_model(model: Model, path: str | Path, example_ids: torch.Tensor) -> torch.export.ExportedProgram:
    """Export `model(input_ids) -> logits` with dynamic batch and sequence length, and save it at `path`.

    The exported graph runs the naive MLA path and a static-shape expert kernel, so no host sync and no
    data-dependent loop: a grouped GEMM for a bfloat16 model where this torch has one on its device, else
    per-pair gathered weights. `example_ids` (B, T) should have B >= 2 and T >= 2 so that neither
    dimension is specialised to 1.
    """
    param = next(p for n, p in model.named_parameters() if not n.endswith("mlp.gate.weight"))
    # torch's tracing rule for grouped GEMM accepts bfloat16 only, whatever the eager kernel takes
    bf16 = param.dtype == torch.bfloat16
    impl = "grouped" if bf16 and grouped_mm_available(param.device, param.dtype) else "gather"
    saved = [(m, m.impl) for m in model.modules() if hasattr(m, "impl")]
    saved_absorb = [(m, m.absorb) for m in model.modules() if hasattr(m, "absorb")]
    was_training = model.training
    model.eval()
    model.set_experts_impl(impl)
    model.set_absorb(False)
    try:
        batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
        program = torch.export.export(model, (example_ids.to(param.device),),
                                      dynamic_shapes=({0: batch, 1: seq},))
    finally:
        for m, v in saved:
            m.impl = v
        for m, v in saved_absorb:
            m.absorb = v
        model.train(was_training)
    write_atomic(Path(path), lambda f: torch.export.save(program, f,
                                                     extra_files={CONFIG_FILE: json.dumps(model.config.to_dict())}))
    return program


def config_from_export(path: str | Path) -> ModelConfig:
    """The ModelConfig saved inside an exported artifact."""
    extra = {CONFIG_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    if not extra[CONFIG_FILE]:
        raise ValueError(f"{path}: exported program has no {CONFIG_FILE} (not written by export_model?)")
    return ModelConfig.from_dict(json.loads(extra[CONFIG_FILE]))


def state_dict_from_export(path: str | Path) -> dict[str, torch.Tensor]:
    """The artifact's weights in the checkpoint layout, HF names: what save_model would write to disk
    (one tensor per expert, MTP layers with their embedding copy), on CPU.
    """
    extra = {CONFIG_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    if not extra[CONFIG_FILE]:
        raise ValueError(f"{path}: exported program has no {CONFIG_FILE} (not written by export_model?)")
    config = ModelConfig.from_dict(json.loads(extra[CONFIG_FILE]))
    state = {k: v.detach().cpu() for k, v in program.state_dict.items()}
    return to_file_layout(state, config)
