"""What `dh-mlx info` reports: parameter counts, KV-cache and weight memory, beside two dense references."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from . import backend
from .device import compute_dtype
from .backend.cpu.streams import WIDE_BFS_WIDTH
from .params import CONTEXTS, KV_REFERENCES, count_params, indexer_cache_values, kv_bytes_per_token, \
    reference_kv_bytes_per_token, v4_window_bytes, weight_bytes


def model_info(config: ModelConfig) -> dict[str, Any]:
    """A JSON-ready summary; KV figures use bf16 (2 bytes) for all models so they compare like for like."""
    p = count_params(config)
    kv = kv_bytes_per_token(config, 2)
    info: dict[str, Any] = {
        "total_params": p.total,
        "active_params": p.active,
        "mtp_params": p.mtp,
        "mtp_active_params": p.mtp_active,
        "routed_experts": config.n_routed_experts,
        "experts_per_token": config.num_experts_per_tok if config.has_moe else None,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": config.model_type,
        "kv_bytes_per_token": kv,
        "indexer_kv_bytes_per_token": indexer_cache_values(config) * 2,
        "sparse_attention": {"index_topk": config.index_topk, "index_n_heads": config.index_n_heads,
                             "index_head_dim": config.index_head_dim,
                             "layers_with_indexer": sum(config.has_indexer(i) for i in range(config.num_hidden_layers))}
        if config.sparse_attention else None,
        "vision_tower": "not supported (the language model runs, text only)" if config.model_type == "kimi_k25"
        else None,
        # DeepSeek-V4: per token only compressed entries are cached; the sliding windows are a constant
        "kv_window_bytes": v4_window_bytes(config) if config.model_type == "deepseek_v4" else 0,
        "kv_dtype": "bfloat16",
        "kv_bytes": {name: kv * n + (v4_window_bytes(config) if config.model_type == "deepseek_v4" else 0)
                     for name, n in CONTEXTS.items()},
        "weight_bytes": {label: weight_bytes(p.total + p.mtp, bits)
                         for label, bits in (("float32", 32), ("bfloat16", 16), ("8-bit", 8), ("4-bit", 4))},
        "kv_references": {name: {"kv_bytes_per_token": reference_kv_bytes_per_token(name),
                                 "kv_bytes": {c: reference_kv_bytes_per_token(name) * n for c, n in CONTEXTS.items()}}
                          for name in KV_REFERENCES},
        "domains": config.domain_routing.names if config.domain_routing else None,
        "domain_experts": _domain_experts(config),
        "compute_dtype": str(compute_dtype()).replace("mlx.core.", ""),
    }
    b = backend.describe()
    info.update(cpu=b["cpu"], blas=b["blas"], cpu_kernels=b["cpu_kernels"], native_kernels=b["native_kernels"],
                weight_kernels=b["weight_kernels"], backend_operations=b["operations"],
                mlx_bfs_max_width=b["eval_order_width"])
    return info


def _domain_experts(config: ModelConfig) -> dict[str, Any] | None:
    """Each domain's routed experts and the size of the model `dh-mlx domains extract` writes for it."""
    if config.domain_routing is None:
        return None
    from .domains import domain_experts, extract_config
    experts = domain_experts(config)
    out = {}
    for name in config.domain_routing.names:
        p = count_params(extract_config(config, name))
        out[name] = {"experts": experts[name], "extracted_params": p.total + p.mtp,
                     "extracted_bytes": weight_bytes(p.total + p.mtp, 16)}
    return {"common": experts["common"], "domains": out}


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1024
    return ""


def _span(ids: list[int]) -> str:
    return "none" if not ids else f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids)


def format_info(info: dict[str, Any], title: str) -> str:
    lines = [f"{title}",
             f"  parameters        {info['total_params'] / 1e9:.3f} B total, {info['active_params'] / 1e9:.3f} B "
             f"active per token",
             f"  MTP modules       {info['mtp_params'] / 1e9:.3f} B (not in the totals above)"]
    if info["routed_experts"]:
        lines.append(f"  experts           {info['routed_experts']} routed, {info['experts_per_token']} per token")
    if info["domains"]:
        lines.append(f"  domains           {', '.join(info['domains'])}")
        de = info["domain_experts"]
        common = de["common"]
        lines.append(f"    common experts  {_span(common)} (every domain's)")
        for name, d in de["domains"].items():
            lines.append(f"    {name:<15} experts {_span(d['experts'])}; extracted: "
                         f"{d['extracted_params'] / 1e6:,.1f} M parameters, {_size(d['extracted_bytes'])} bf16")
    sa = info["sparse_attention"]
    if sa:
        lines.append(f"  sparse attention  each query attends to {sa['index_topk']:,} positions, chosen by an indexer "
                     f"({sa['index_n_heads']} heads x {sa['index_head_dim']}) in {sa['layers_with_indexer']} layers")
    if info["vision_tower"]:
        lines.append(f"  vision tower      {info['vision_tower']}")
    lines.append(f"  context           {info['max_position_embeddings']:,} tokens")
    lines.append("  weights           " + ", ".join(f"{k} {_size(v)}" for k, v in info["weight_bytes"].items()))
    lines.append(f"  KV cache (bf16)   {info['kv_bytes_per_token']:,} B/token; " +
                 ", ".join(f"{c} {_size(v)}" for c, v in info["kv_bytes"].items()))
    if info["indexer_kv_bytes_per_token"]:
        lines.append(f"    of which the indexers' keys {info['indexer_kv_bytes_per_token']:,} B/token")
    if info["kv_window_bytes"]:
        lines.append(f"    (compressed entries per token; plus the sliding windows, "
                     f"{_size(info['kv_window_bytes'])} at any length)")
    for name, ref in info["kv_references"].items():
        ratio = ref["kv_bytes_per_token"] / info["kv_bytes_per_token"]
        lines.append(f"    vs {name:<13} {ref['kv_bytes_per_token']:,} B/token ({ratio:.1f}x ours); " +
                     ", ".join(f"{c} {_size(v)}" for c, v in ref["kv_bytes"].items()))
    lines.append(f"  CPU               {info['cpu']}")
    lines.append(f"  compute dtype     {info['compute_dtype']}   BLAS: {info['blas']}")
    k = info["cpu_kernels"]
    lines.append(f"  compiled kernels  {'vectorising g++ flags, cache ' + k if k.startswith('/') else k}")
    lines.append(f"  native kernels    {info['native_kernels']}")
    lines.append(f"  weight kernels    {info['weight_kernels']} (4/8-bit and bfloat16/float16 weights)")
    lines.append(f"  CPU operations    {info['backend_operations']}")
    lines.append(f"  MLX eval order    {info['mlx_bfs_max_width']} wide (MLX_BFS_MAX_WIDTH; `dh-mlx train` and "
                 f"`lora` use {WIDE_BFS_WIDTH})")
    return "\n".join(lines)
