"""DeepSeek-V4's checkpoint names and FP8 scales -> the module names of dh_mlx.model.v4_model (no framework here).

The release names DeepSeek's own way (`embed.weight`, `layers.3.attn.wq_a.weight`, `layers.3.ffn.experts.7.w1`,
`hc_head_fn`, FP8 block scales under `.scale`, possibly as UE8M0 exponent bytes); transformers' save_pretrained
writes the same leaves under `model.`. Both become transformers' module names (`model.layers.3.self_attn.
q_a_proj.weight`, experts one per index as `mlp.experts.7.gate_proj.weight`, stacked later), as its
conversion mapping reads them. The release's MTP modules (`mtp.0.attn.wq_a.weight`, `mtp.0.e_proj.weight`,
`mtp.0.hc_head_fn`, ...; transformers writes none) become layers past the main stack, as DeepSeek-V3's sit
(`model.layers.43.self_attn.q_a_proj.weight`, `model.layers.43.e_proj.weight`, `model.layers.43.hc_head.hc_fn`).
`release_name` goes back (what `convert hf` writes).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable

# (pattern, replacement) in order, on a name without its leading "model."
_RULES = [
    (r"^embed\.", "embed_tokens."),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"^(layers\.\d+)\.hc_head_(fn|base|scale)$", r"\1.hc_head.hc_\2"),  # an MTP module's own head
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.self_attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"(self_attn|compressor|indexer)\.norm\.", r"\1.kv_norm."),  # (an MTP module's `norm` stays)
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.(experts\.\d+|shared_experts)\.w1\.", r".\1.gate_proj."),
    (r"\.(experts\.\d+|shared_experts)\.w2\.", r".\1.down_proj."),
    (r"\.(experts\.\d+|shared_experts)\.w3\.", r".\1.up_proj."),
    (r"(?<!_hc)\.scale$", ".weight_scale_inv"),  # an FP8 weight's block scales (not a hyper-connection's)
]
_RULES = [(re.compile(p), r) for p, r in _RULES]
# Kept in float32 as transformers keeps them (its _keep_in_fp32_modules_strict)
_FP32 = ("attn_hc.", "ffn_hc.", "hc_head.", ".sinks", "position_bias", "e_score_correction_bias", "q_a_norm.",
         "kv_norm.", "input_layernorm.", "post_attention_layernorm.", "model.norm.")
_MTP = re.compile(r"^mtp\.(\d+)\.")
_MTP_NORMS = re.compile(r"\.layers\.\d+\.[eh]?norm\.")  # an MTP module's enorm, hnorm and norm


def v4_names(where: Path, num_hidden_layers: int, mtp_layers: int) -> Callable[[str], str | None]:
    """File name -> module name; MTP module i becomes layer num_hidden_layers + i. None: an MTP module past
    the `mtp_layers` the config declares, left out (one warning)."""
    warned = []

    def rename(name: str) -> str | None:
        bare = name[len("model."):] if name.startswith("model.") else name
        mtp = _MTP.match(bare)
        if mtp:
            if int(mtp[1]) >= mtp_layers:
                if not warned:
                    warnings.warn(f"{where}: MTP module tensors past the {mtp_layers} config.json declares "
                                  f"(num_nextn_predict_layers), e.g. {name}; loading without them")
                    warned.append(name)
                return None
            bare = f"layers.{num_hidden_layers + int(mtp[1])}." + bare[mtp.end():]
        if bare.endswith("norm.weight") and bare.startswith("norm."):  # the final norm
            return "model." + bare
        for pattern, replacement in _RULES:
            bare = pattern.sub(replacement, bare)
        return bare if bare.startswith("lm_head.") else "model." + bare
    return rename


# module name (inside a layer, without `model.layers.N.`) -> the release's, in order: v4_names read backwards
_BACK = [(re.compile(p), r) for p, r in [
    (r"^self_attn\.compressor\.indexer\.scorer\.weights_proj\.", "attn.indexer.weights_proj."),
    (r"^self_attn\.compressor\.indexer\.q_b_proj\.", "attn.indexer.wq_b."),
    (r"^self_attn\.compressor\.indexer\.", "attn.indexer.compressor."),
    (r"^self_attn\.", "attn."),
    (r"^mlp\.", "ffn."),
    (r"^input_layernorm\.", "attn_norm."),
    (r"^post_attention_layernorm\.", "ffn_norm."),
    (r"^(attn|ffn)_hc\.(fn|base|scale)$", r"hc_\1_\2"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),  # an MTP module's own head
    (r"\.sinks$", ".attn_sink"),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"\.kv_norm\.", ".norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.(experts\.\d+|shared_experts)\.gate_proj\.", r".\1.w1."),
    (r"\.(experts\.\d+|shared_experts)\.down_proj\.", r".\1.w2."),
    (r"\.(experts\.\d+|shared_experts)\.up_proj\.", r".\1.w3."),
]]
_OUTSIDE = {"lm_head.weight": "head.weight"}  # transformers writes the rest of the top level as it names it


def release_name(name: str, num_hidden_layers: int) -> str:
    """Module name (experts one per index) -> the name transformers' save_pretrained writes (`model.layers.3.
    attn.wq_a.weight`, `head.weight`); MTP module i (layer num_hidden_layers + i) -> DeepSeek's `mtp.i.*`."""
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return _OUTSIDE.get(name, name)
    rest = m[2]
    for pattern, replacement in _BACK:
        rest = pattern.sub(replacement, rest)
    i = int(m[1])
    return f"model.layers.{i}.{rest}" if i < num_hidden_layers else f"mtp.{i - num_hidden_layers}.{rest}"


def keep_fp32(name: str) -> bool:
    return any(part in name for part in _FP32) or _MTP_NORMS.search(name) is not None


def e8m0_scales(w: dict, dtypes: dict[str, str], xp: Any) -> dict:
    """UE8M0 scales (one exponent byte per block, `F8_E8M0` or `U8`) as the float32 powers of two they stand for."""
    out = dict(w)
    for k, v in w.items():
        if k.endswith("_scale_inv") and dtypes.get(k) in ("F8_E8M0", "U8"):
            out[k] = xp.power(xp.array(2.0, xp.float32), v.astype(xp.float32) - 127.0)
    return out
