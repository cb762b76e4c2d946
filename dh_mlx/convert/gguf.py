"""Write a model directory as a GGUF file for llama.cpp's `deepseek2` architecture (DeepSeek-V2/V3).

Everything llama.cpp reads for DeepSeek goes into the metadata, including what it would otherwise guess:
the gating function (llama.cpp falls back to softmax without it), group-limited routing, the MLA head sizes
and the DeepSeek YaRN keys. Our domain-routing block rides along under `darkhorse.*`, which llama.cpp
ignores: it routes every token as plain DeepSeek-V3 does (our domain id -1).
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from ..checkpoint.layout import (check_tensors, config_for_tensors, dequantized_config, expected_shapes,
                                read_float32, to_memory_layout)
from ..checkpoint.hub import resolve_path
from ..config import ModelConfig, load_config
from ..outputs import check_output_file
from ..files import write_atomic
from ..tokenizer import load_tokenizer
from .errors import ConvertError
from .gguf_tensors import FILE_TYPES, OUTTYPES, encode, gguf_tensors
from .gguf_vocab import add_bpe_vocab, add_vocab, bpe_vocab
from .quantize import check_quantizer, quantize_gguf

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]
GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}


def no_v4(config: ModelConfig, model_dir: Path) -> None:
    if config.model_type == "deepseek_v4":
        raise ConvertError(f"{model_dir}: convert gguf: llama.cpp has no deepseek_v4 architecture to write it as")


def unsupported(config: ModelConfig) -> list[str]:
    """What llama.cpp's deepseek2 graph cannot express for this config (empty: the GGUF is exact)."""
    c, problems = config, []
    if not c.has_moe:
        problems.append("n_routed_experts is null: llama.cpp's deepseek2 expects MoE layers after the dense ones")
    else:
        if c.moe_layer_freq != 1:
            problems.append(f"moe_layer_freq={c.moe_layer_freq}: llama.cpp makes every layer after "
                            "first_k_dense_replace an MoE layer (needs 1)")
        if not c.n_shared_experts:
            problems.append("n_shared_experts is null: llama.cpp's deepseek2 needs shared experts")
        grouped = c.n_group > 1 and c.topk_group < c.n_group and c.topk_method != "greedy"
        if grouped and c.topk_method == "group_limited_greedy":
            problems.append("topk_method 'group_limited_greedy' with topk_group < n_group: llama.cpp scores a "
                            "group by its two best experts (noaux_tc), not by its best one")
    if c.domain_routing is not None and c.domain_routing.added:
        problems.append(f"added domains ({', '.join(c.domain_routing.added)}): llama.cpp would route id-less "
                        "tokens to their experts; extract a domain (dh-mlx domains extract) and convert that")
    if c.attention_bias:
        problems.append("attention_bias=true: llama.cpp's deepseek2 has no attention biases")
    if c.rope_type == "yarn" and not c.rope_scaling.get("truncate", True):
        problems.append("rope_scaling.truncate=false: llama.cpp rounds the YaRN correction range")
    return problems


def _yarn_metadata(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    rs = config.rope_scaling
    factor = float(rs["factor"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(factor)
    writer.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
    writer.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
    if rs.get("mscale_all_dim"):
        # llama.cpp divides this by 0.1 again and scales the softmax by mscale(factor, mscale_all_dim)^2;
        # the cos/sin magnitude it then assumes is 1 (ours is folded into the weights).
        writer.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])
    else:
        # Without the key llama.cpp scales cos/sin and the softmax by mscale(factor); ours scales only cos/sin,
        # and that factor is folded into the weights, so cancel llama.cpp's.
        writer.add_rope_scaling_attn_factors(1 / (0.1 * math.log(factor) + 1))


def add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, *, name: str, outtype: str, mtp: int) -> None:
    c = config
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers + mtp)
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(1)  # absorbed MLA: one shared latent "head"
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_q_lora_rank(c.q_lora_rank or 0)  # 0: q_proj without compression
    writer.add_kv_lora_rank(c.kv_lora_rank)
    # what the latent cache holds per token, and the per-head sizes after decompression
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if c.rope_type == "yarn":
        _yarn_metadata(writer, c)
    writer.add_expert_count(c.n_routed_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_shared_count(c.n_shared_experts)
    writer.add_expert_shared_feed_forward_length(c.moe_intermediate_size * c.n_shared_experts)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    # we renormalise softmax weights only for k > 1 (DeepSeek-V2), sigmoid weights always (V3)
    writer.add_expert_weights_norm(bool(c.norm_topk_prob and (c.scoring_func == "sigmoid"
                                                              or c.num_experts_per_tok > 1)))
    writer.add_expert_gating_func(GATING[c.scoring_func])
    if c.n_group > 1 and c.topk_group < c.n_group and c.topk_method != "greedy":
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
    writer.add_nextn_predict_layers(mtp)
    if c.domain_routing is not None:
        writer.add_array("darkhorse.domains", list(c.domain_routing.names))
        writer.add_uint32("darkhorse.experts_per_domain", c.domain_routing.experts_per_domain)


def read_weights(model_dir: Path) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """The directory's float32 tensors in our stacked layout, and its config (without MTP if the checkpoint
    has none); every tensor's name and shape must be the config's."""
    config = load_config(model_dir)
    no_v4(config, model_dir)
    if config.sparse_attention:
        raise ConvertError(f"{model_dir}: {config.model_type} attends through a sparse-attention indexer, which "
                           "llama.cpp's deepseek2 architecture does not have")
    if config.extra.get("quantization"):
        raise ConvertError(f"{model_dir}: an MLX-quantized model; write the GGUF from its float checkpoint "
                           "(`quantize` runs llama.cpp's own quantizer)")
    weights = read_float32(model_dir, config)
    config = dequantized_config(config)  # FP8 weights are float now
    config = config_for_tensors(config, weights, model_dir)
    weights = to_memory_layout(weights, config, np.stack)
    check_tensors({k: a.shape for k, a in weights.items()}, expected_shapes(config), model_dir)
    return weights, config


def write_gguf(model_dir: str | Path, out: str | Path, *, outtype: str = "f16", mtp: bool = True,
               force: bool = False) -> Path:
    """Write `model_dir` (config.json, safetensors, tokenizer.model) as one GGUF file at `out` (an existing
    file only with `force`); written to a temporary file beside it, removed if writing fails."""
    model_dir, out = resolve_path(model_dir), Path(out)
    check_output_file(out, inputs=[model_dir], force=force)
    if outtype not in OUTTYPES:
        raise ConvertError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    no_v4(load_config(model_dir), model_dir)
    if problems := unsupported(load_config(model_dir)):
        raise ConvertError(f"{model_dir}: llama.cpp cannot run this model exactly: " + "; ".join(problems))
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ConvertError(f"{model_dir}: no tokenizer.model or tokenizer.json (a GGUF file carries its vocabulary)")
    bpe = None if hasattr(tokenizer, "sp") else bpe_vocab(tokenizer, load_config(model_dir).vocab_size)
    weights, config = read_weights(model_dir)
    n_mtp = config.num_nextn_predict_layers if mtp else 0
    tensors = gguf_tensors(weights, config, mtp=bool(n_mtp))

    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(writer, config, name=model_dir.resolve().name, outtype=outtype, mtp=n_mtp)
        if bpe is None:
            add_vocab(writer, tokenizer, config.vocab_size)
        else:
            add_bpe_vocab(writer, tokenizer, bpe)
        for name, a in tensors.items():
            data, kind = encode(name, a, outtype)
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(out, write)  # a fresh temporary file beside `out`, renamed over it when whole
    return out


def export_gguf(model_dir: str | Path, out: str | Path, *, outtype: str = "f16", quantize: str | None = None,
                mtp: bool = True, force: bool = False) -> Path:
    """`model_dir` -> GGUF at `out`: written as `outtype`, then (with `quantize`: Q4_K_M, Q5_K_M, Q8_0) run
    through llama.cpp's own quantizer, the `outtype` file being its input."""
    if quantize is None:
        return write_gguf(model_dir, out, outtype=outtype, mtp=mtp, force=force)
    out = check_output_file(out, inputs=[model_dir], force=force)
    check_quantizer(quantize)  # before the (long) write
    source = out.with_name(f".{outtype}-{out.name}")
    write_gguf(model_dir, source, outtype=outtype, mtp=mtp, force=True)
    try:
        return quantize_gguf(source, out, quantize)
    finally:
        source.unlink(missing_ok=True)
