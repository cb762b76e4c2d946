"""One name table: our checkpoint (HF DeepSeek-V3) <-> GGUF (llama.cpp `deepseek2`) <-> DeepSeek's official
inference code (`inference/model.py`, as its `convert.py` writes it).

`{i}` is a layer index, `{e}` an expert index. Our column is the on-disk layout (one tensor per expert); in
memory our routed experts are stacked, which is the same name with `.{e}` removed, and GGUF stores them stacked
too. None: the format has no such tensor.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Names(NamedTuple):
    ours: str
    gguf: str | None
    official: str | None


_L = "model.layers.{i}."
TABLE: tuple[Names, ...] = (
    Names("model.embed_tokens.weight", "token_embd.weight", "embed.weight"),
    Names("model.norm.weight", "output_norm.weight", "norm.weight"),
    Names("lm_head.weight", "output.weight", "head.weight"),
    Names(_L + "input_layernorm.weight", "blk.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight"),
    Names(_L + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    # attention (MLA)
    Names(_L + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "layers.{i}.attn.wq.weight"),
    Names(_L + "self_attn.q_a_proj.weight", "blk.{i}.attn_q_a.weight", "layers.{i}.attn.wq_a.weight"),
    Names(_L + "self_attn.q_a_layernorm.weight", "blk.{i}.attn_q_a_norm.weight", "layers.{i}.attn.q_norm.weight"),
    Names(_L + "self_attn.q_b_proj.weight", "blk.{i}.attn_q_b.weight", "layers.{i}.attn.wq_b.weight"),
    Names(_L + "self_attn.kv_a_proj_with_mqa.weight", "blk.{i}.attn_kv_a_mqa.weight", "layers.{i}.attn.wkv_a.weight"),
    Names(_L + "self_attn.kv_a_layernorm.weight", "blk.{i}.attn_kv_a_norm.weight", "layers.{i}.attn.kv_norm.weight"),
    # GGUF splits this into attn_k_b / attn_v_b (dh_mlx.convert.gguf.split_kv_b)
    Names(_L + "self_attn.kv_b_proj.weight", "blk.{i}.attn_kv_b.weight", "layers.{i}.attn.wkv_b.weight"),
    Names(_L + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "layers.{i}.attn.wo.weight"),
    # dense feed-forward (official: w1 gate, w2 down, w3 up)
    Names(_L + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "layers.{i}.ffn.w1.weight"),
    Names(_L + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "layers.{i}.ffn.w2.weight"),
    Names(_L + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "layers.{i}.ffn.w3.weight"),
    # MoE: router, selection bias, routed and shared experts
    Names(_L + "mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight", "layers.{i}.ffn.gate.weight"),
    Names(_L + "mlp.gate.e_score_correction_bias", "blk.{i}.exp_probs_b.bias", "layers.{i}.ffn.gate.bias"),
    Names(_L + "mlp.experts.{e}.gate_proj.weight", "blk.{i}.ffn_gate_exps.weight", "layers.{i}.ffn.experts.{e}.w1.weight"),
    Names(_L + "mlp.experts.{e}.down_proj.weight", "blk.{i}.ffn_down_exps.weight", "layers.{i}.ffn.experts.{e}.w2.weight"),
    Names(_L + "mlp.experts.{e}.up_proj.weight", "blk.{i}.ffn_up_exps.weight", "layers.{i}.ffn.experts.{e}.w3.weight"),
    Names(_L + "mlp.shared_experts.gate_proj.weight", "blk.{i}.ffn_gate_shexp.weight",
          "layers.{i}.ffn.shared_experts.w1.weight"),
    Names(_L + "mlp.shared_experts.down_proj.weight", "blk.{i}.ffn_down_shexp.weight",
          "layers.{i}.ffn.shared_experts.w2.weight"),
    Names(_L + "mlp.shared_experts.up_proj.weight", "blk.{i}.ffn_up_shexp.weight",
          "layers.{i}.ffn.shared_experts.w3.weight"),
    # MTP modules (layers num_hidden_layers + k); the official inference code has none
    Names(_L + "enorm.weight", "blk.{i}.nextn.enorm.weight", None),
    Names(_L + "hnorm.weight", "blk.{i}.nextn.hnorm.weight", None),
    Names(_L + "eh_proj.weight", "blk.{i}.nextn.eh_proj.weight", None),
    Names(_L + "shared_head.norm.weight", "blk.{i}.nextn.shared_head_norm.weight", None),
    Names(_L + "shared_head.head.weight", "blk.{i}.nextn.shared_head_head.weight", None),
    # the on-disk copy of the embedding (llama.cpp falls back to token_embd without it)
    Names(_L + "embed_tokens.weight", None, None),
)

COLUMNS = ("ours", "stacked", "gguf", "official")


def _column(row: Names, column: str) -> str | None:
    if column == "stacked":  # our in-memory layout: routed experts stacked along a new first axis
        return row.ours.replace(".{e}", "")
    return getattr(row, column)


def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(body + "$")


_COMPILED = {c: [(_regex(p), row) if (p := _column(row, c)) else (None, row) for row in TABLE] for c in COLUMNS}


def rename(name: str, src: str, dst: str) -> str | None:
    """`name` in column `src` written in column `dst`; None when `src` has no such name or `dst` no such tensor.

    Columns: ours (on disk), stacked (ours in memory), gguf, official. An expert index that `dst` does not
    keep (`{e}` only on one side) is dropped: the caller stacks or unstacks.
    """
    for regex, row in _COMPILED[src]:
        if regex is None or not (m := regex.match(name)):
            continue
        target = _column(row, dst)
        if target is None:
            return None
        fields = {k: v for k, v in m.groupdict().items() if v is not None}
        return target.replace("{i}", fields.get("i", "{i}")).replace("{e}", fields.get("e", "{e}"))
    return None
