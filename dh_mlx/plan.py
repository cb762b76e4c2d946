"""`dh-mlx info --plan`: memory per rank and bytes on the wire per step for data-parallel, FSDP and pipeline
layouts over N machines, and the time those bytes take on a named link. Arithmetic on the config, no
measurement: every figure is an estimate, printed with the assumptions it rests on.

Training precision (the usual mixed-precision accounting): bf16 weights and gradients, which are what the
links carry, and fp32 master weights and AdamW moments: 2 + 2 + 4 + 8 = 16 bytes per parameter. Activations:
`train.memory.activation_elements` with activation checkpointing, in bf16. Per step each rank sends:
data-parallel, a ring all-reduce of the gradients, 2 (N-1)/N x 2 bytes per parameter; FSDP (ZeRO-3, as
PyTorch's FSDP2 shards), an all-gather of the weights for the forward and again for the backward and a
reduce-scatter of the gradients, 3 (N-1)/N x 2 bytes per parameter; pipeline, each micro-batch's hidden state
forward and its gradient backward across each stage boundary.
"""

from __future__ import annotations

import math
from typing import Any

from .config import ModelConfig
from .files import format_bytes
from .params import count_params, kv_bytes_per_token, weight_bytes
from .train.memory import activation_elements

# Nominal one-direction bandwidths, bytes per second.
LINKS = {"10gbe": ("10 GbE", 1.25e9), "thunderbolt5": ("Thunderbolt 5", 10e9),
         "infiniband": ("InfiniBand NDR 400 Gb/s", 50e9), "nvlink": ("NVLink 4 (H100)", 450e9)}
BYTES_PER_PARAM = {"weights": 2, "gradients": 2, "optimizer": 12}  # bf16 weights and grads; fp32 master + m + v
WIRE = 2  # bf16


def _layout(name: str, weights: float, grads: float, optimizer: float, activations: float, sent: float,
            memory: float, bandwidth: float, note: str) -> dict[str, Any]:
    total = weights + grads + optimizer + activations
    return {"layout": name, "weights": weights, "gradients": grads, "optimizer": optimizer,
            "activations": activations, "total": total, "fits": total <= memory, "bytes_per_step": sent,
            "comm_seconds": sent / bandwidth, "note": note}


def plan(config: ModelConfig, *, machines: int = 2, memory_gb: float = 192.0, link: str = "thunderbolt5",
         batch: int = 1, seq_len: int = 4096, context: int = 32768) -> dict[str, Any]:
    """Training and serving layouts of `config` over `machines` of `memory_gb` GB each, joined by `link`."""
    if link not in LINKS:
        raise ValueError(f"`link` must be one of {', '.join(LINKS)}, got {link!r}")
    if machines < 1 or memory_gb <= 0 or batch < 1 or seq_len < 1:
        raise ValueError("`machines`, `memory`, the batch and the sequence length must be positive")
    p = count_params(config)
    n = p.total + p.mtp
    N, memory, (link_name, bw) = machines, memory_gb * 1e9, LINKS[link]
    act = 2 * activation_elements(config, batch, seq_len, checkpointing=True)
    w, g, o = (n * BYTES_PER_PARAM[k] for k in ("weights", "gradients", "optimizer"))
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    layer_bytes = max(weight_bytes(n // layers, 16), 1)  # an FSDP rank gathers a layer's weights (the mean layer)
    hidden = batch * seq_len * config.hidden_size * WIRE
    micro = 2 * N  # micro-batches per step, enough to keep the pipeline's bubble near a third
    training = [
        _layout("data-parallel", w, g, o, act, 2 * (N - 1) / N * n * WIRE, memory, bw,
                "every rank holds the whole model; the gradients are all-reduced"),
        _layout("FSDP", w / N + 2 * layer_bytes, g / N, o / N, act, 3 * (N - 1) / N * n * WIRE, memory, bw,
                "weights, gradients and AdamW state sharded over the ranks (FSDP2 fully_shard, ZeRO-3)"),
        # 1F1B: a stage keeps up to N micro-batches in flight for its 1/N of the layers
        _layout("pipeline", w / N, g / N, o / N, act, 2 * micro * hidden if N > 1 else 0, memory, bw,
                f"{math.ceil(config.num_hidden_layers / N)} layers per rank, {micro} micro-batches per step "
                f"(idle share {(N - 1) / (micro + N - 1):.0%})"),
    ]
    kv = kv_bytes_per_token(config, 2) * context * batch
    serving = [{"layout": f"{bits}-bit" if bits < 16 else "bf16",
                "weights_per_rank": weight_bytes(n, bits) / N, "kv_cache": kv,
                "fits": weight_bytes(n, bits) / N + kv <= memory} for bits in (16, 8, 4)]
    need_train = math.ceil(sum((w, g, o)) / max(memory - act - 2 * layer_bytes, 1))
    need_serve = {s["layout"]: math.ceil(weight_bytes(n, b) / max(memory - kv, 1))
                  for s, b in zip(serving, (16, 8, 4))}
    return {"estimate": "from the config alone (dh_mlx/plan.py): not a measurement",
            "assumptions": "bf16 weights and gradients on the wire, fp32 master weights and AdamW moments "
                           "(16 B/parameter), activation checkpointing, nominal one-way link bandwidth",
            "params": n, "active_params": p.active + p.mtp_active, "params_without_mtp": p.total,
            "active_params_without_mtp": p.active, "machines": N, "memory": memory,
            "link": link_name, "bandwidth": bw, "batch": batch, "seq_len": seq_len, "context": context,
            "training": training, "serving": serving, "fsdp_machines_needed": need_train,
            "serving_machines_needed": need_serve}


def format_plan(p: dict[str, Any], title: str) -> str:
    mtp = p["params"] - p["params_without_mtp"]
    counted = (f" with the MTP module, which every figure below counts ({p['params_without_mtp'] / 1e9:.1f} B / "
               f"{p['active_params_without_mtp'] / 1e9:.1f} B without it)" if mtp else "")
    lines = [f"{title}: {p['params'] / 1e9:.1f} B parameters, {p['active_params'] / 1e9:.1f} B active per token"
             f"{counted}; {p['machines']} machine(s) of {format_bytes(p['memory'], 'GB')}, linked by {p['link']} "
             f"({p['bandwidth'] / 1e9:g} GB/s one way, nominal)",
             "ESTIMATES from the config (dh_mlx/plan.py), not measurements.",
             f"training, {p['batch']} x {p['seq_len']} tokens per rank and micro-batch, activation checkpointing; "
             "bf16 weights and gradients (on the wire), fp32 master weights and AdamW moments: 16 B/parameter",
             f"  {'layout':<14} {'weights':>11} {'gradients':>11} {'AdamW':>11} {'activations':>11} "
             f"{'per rank':>11}  fits  {'sent/step':>11} {'link time':>9}"]
    for t in p["training"]:
        lines.append(f"  {t['layout']:<14} {format_bytes(t['weights'], 'GB'):>11} {format_bytes(t['gradients'], 'GB'):>11} "
                     f"{format_bytes(t['optimizer'], 'GB'):>11} {format_bytes(t['activations'], 'GB'):>11} {format_bytes(t['total'], 'GB'):>11}  "
                     f"{'yes' if t['fits'] else 'no ':<4}  {format_bytes(t['bytes_per_step'], 'GB'):>11} {t['comm_seconds']:>8.2f}s")
        lines.append(f"  {'':<14} {t['note']}")
    lines.append(f"serving, {p['context']:,}-token context (bf16 KV cache), layers or tensors split over the "
                 "ranks (pipeline, or vLLM --tensor-parallel-size):")
    for s in p["serving"]:
        lines.append(f"  {s['layout']:<14} weights {format_bytes(s['weights_per_rank'], 'GB')} per rank, KV cache "
                     f"{format_bytes(s['kv_cache'], 'GB')}: {'fits' if s['fits'] else 'does not fit'}")
    serve = ", ".join(f"{k} on {v}" for k, v in p["serving_machines_needed"].items())
    lines.append(f"needs: training (FSDP) at least {p['fsdp_machines_needed']} machine(s) of this memory; "
                 f"serving {serve}")
    return "\n".join(lines)
