"""Write a model directory that transformers' `DeepseekV3ForCausalLM` and vLLM load as they are (DeepSeek-V4:
the release layout transformers' `DeepseekV4ForCausalLM` loads, checkpoint/v4_weights.py).

Our checkpoint already is the HF DeepSeek-V3 layout (MTP layers included, as vLLM's `mtp` speculative method
reads them); this adds what a hub-style directory carries beside it: sharded safetensors with an index, the
tokenizer files and generation_config.json. vLLM and transformers ignore `domain_routing`: they route every
token as plain DeepSeek-V3 (our domain id -1).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.layout import stored_dtype
from ..checkpoint.v4_weights import save_v4_model
from ..files import read_json, write_atomic
from ..outputs import check_output_dir
from ..progress import note
from ..tokenizer import load_tokenizer, write_hf_files
from ..checkpoint.weights import DEFAULT_SHARD_BYTES, load_model, resolve_path, save_model
from .errors import ConvertError

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# The MLA heads (kv_lora_rank + qk_rope_head_dim) vLLM's MLA kernels take: 576, 512 and 320 on its CPU backend,
# 576 in FlashMLA (vLLM 0.32's attention backends list them); others fail with "Head dimension N is not supported".
VLLM_MLA_HEADS = (576, 512, 320)


def export_hf(model_dir: str | Path, out: str | Path, *, mtp: bool = True, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
    """`model_dir` -> `out`: config.json, sharded safetensors + index, tokenizer files, generation_config.json.

    `dtype` (float32, bfloat16, float16) defaults to the dtype the checkpoint is stored in; `mtp=False` leaves
    the MTP layers out (and sets num_nextn_predict_layers to 0).
    """
    model_dir = resolve_path(model_dir)
    out = check_output_dir(out, inputs=[model_dir], force=force)
    dtype = dtype or stored_dtype(model_dir)
    if dtype not in _SAFETENSORS_DTYPES.values():
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(_SAFETENSORS_DTYPES.values())}")
    model = load_model(model_dir, dtype="float32")
    if model.config.model_type == "deepseek_v4":
        if model.config.extra.get("quantization") is not None:
            raise ConvertError(f"{model_dir}: an MLX-quantized deepseek_v4 model; the release layout is float: "
                               "convert its float or FP8 checkpoint")
        save_v4_model(model, out, mtp=mtp, max_shard_bytes=max_shard_bytes, dtype=dtype)
    else:
        _save_v3(model, model_dir, out, mtp=mtp, max_shard_bytes=max_shard_bytes, dtype=dtype)

    config = read_json(out / "config.json", "config")
    config["torch_dtype"] = dtype
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is not None:
        write_hf_files(tokenizer, out)
        # the tokenizer is the truth about special ids; vLLM and generate() read them from these files
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    eos = list(tokenizer.eos_ids) if tokenizer is not None and len(tokenizer.eos_ids) > 1 else config.get("eos_token_id")
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos,
                  "pad_token_id": config.get("pad_token_id"), "do_sample": False}
    write_atomic(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out


def _save_v3(model, model_dir: Path, out: Path, **options) -> None:
    dr = model.config.domain_routing
    if dr is not None and dr.added:  # transformers and vLLM ignore domain_routing: they would use these experts
        raise ConvertError(f"{model_dir}: has added domains ({', '.join(dr.added)}), which transformers and vLLM "
                           "would route every token to; export a domain with dh-mlx domains extract instead")
    head = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    if head not in VLLM_MLA_HEADS:
        note(f"{model_dir}: MLA head {head} (kv_lora_rank + qk_rope_head_dim): transformers loads the export, "
             f"vLLM's MLA kernels refuse it (they take {', '.join(map(str, VLLM_MLA_HEADS))})")
    save_model(model, out, **options)
