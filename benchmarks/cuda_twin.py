"""The PyTorch twin on an NVIDIA GPU: logits parity with the MLX model, and decode speed for a preset.

Prints one JSON object per result, keys name, value, unit, comparison. Without a CUDA device it prints one
line saying it skipped and exits 0.

Parity: one checkpoint directory (the `tiny` preset, random weights with a spread-out router so that no
expert choice is a near tie) is read by the twin on CUDA in float32 and bfloat16 and compared with MLX on
the CPU in float32; where MLX is not importable (the usual CUDA box) the reference is the twin on the CPU
in float32, and each result's `comparison` says which reference was used.

Speed: greedy decode of the `1b` preset (random weights, seed 0) in bfloat16, batch 1, eager PyTorch.

    python benchmarks/cuda_twin.py [--decode-preset 1b] [--prompt-tokens 128] [--decode-tokens 128]

`--device cpu` runs the same measurements on the CPU (a smoke test of this script, not a benchmark).

On a lent GPU machine (the device tool; it has torch and no MLX), from the repository root:

    set -o pipefail; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; \
    PYTHONUNBUFFERED=1 timeout 420 python3 benchmarks/cuda_twin.py 2>&1 | tee $OUT/cuda_twin.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARITY_PRESET = "tiny"


def emit(name: str, value, unit: str | None, comparison: str | None, **extra) -> None:
    print(json.dumps({"name": name, "value": value, "unit": unit, "comparison": comparison, **extra}), flush=True)


def import_twin() -> tuple[types.ModuleType, bool]:
    """(dh_mlx.torch, whether MLX is importable); dh_mlx imports without MLX for the twin's sake."""
    sys.path.insert(0, str(ROOT))
    import importlib.util

    import dh_mlx.torch as twin
    return twin, importlib.util.find_spec("mlx") is not None


def spread_router(model, seed: int) -> None:
    """Router weights and biases large enough that CPU/GPU rounding cannot flip an expert choice."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("mlp.gate.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.6 - 0.3)


def parity(twin, has_mlx: bool, tokens: int, device: str) -> None:
    import numpy as np
    import torch
    from dh_mlx.config import load_preset

    config = load_preset(PARITY_PRESET)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, tokens))
    with tempfile.TemporaryDirectory() as d:
        source = twin.random_model(config, seed=0, device="cpu", dtype="float32")
        spread_router(source, 0)
        twin.save_model(source, d)
        if has_mlx:
            import mlx.core as mx
            from dh_mlx import load_model
            out = load_model(d, dtype="float32").forward(mx.array(ids))
            ref, ref_experts = np.array(out.logits), [np.array(r.indices) for r in out.routing]
            against = "MLX CPU float32"
        else:
            with torch.no_grad():
                out = twin.load_model(d, device="cpu", dtype="float32").forward_full(torch.tensor(ids))
            ref, ref_experts = out.logits.numpy(), [r.indices.numpy() for r in out.routing]
            against = "twin CPU float32 (MLX not importable here)"
        what = f"{PARITY_PRESET} preset, same checkpoint dir, 2x{tokens} tokens, vs {against}; |ref| max " \
               f"{np.abs(ref).max():.3g}"
        for dtype, tol in (("float32", 1e-4), ("bfloat16", None)):
            model = twin.load_model(d, device=device, dtype=dtype)
            with torch.no_grad():
                out = model.forward_full(torch.tensor(ids, device=device))
            got = out.logits.float().cpu().numpy()
            diff = np.abs(got - ref).max(axis=-1)  # (B, T)
            emit(f"parity_{dtype}_max_abs_diff", float(diff.max()), "logit",
                 f"twin {device} {dtype}, {what}" + (f"; tolerance {tol}: {'pass' if diff.max() <= tol else 'FAIL'}"
                                                    if tol else ""))
            # A token whose expert set differs in some layer (a near tie that rounding decides) differs by
            # more than rounding; the same-routing figure is the arithmetic's own error.
            same = np.ones(ids.shape, bool)
            for a, b in zip(out.routing, ref_experts):
                same &= (np.sort(a.indices.cpu().numpy(), -1) == np.sort(b, -1)).all(-1)
            emit(f"parity_{dtype}_same_routing_fraction", float(same.mean()), "fraction",
                 f"tokens routed to the same experts in every MoE layer, {what}")
            if same.any():
                emit(f"parity_{dtype}_max_abs_diff_same_routing", float(diff[same].max()), "logit",
                     f"twin {device} {dtype}, tokens with identical routing only, {what}")
            emit(f"parity_{dtype}_top1_agreement", float((got.argmax(-1) == ref.argmax(-1)).mean()), "fraction",
                 f"argmax per position, twin {device} {dtype}, {what}")
            del model


def speed(twin, preset: str, prompt_tokens: int, decode_tokens: int, device: str) -> None:
    import torch
    from dh_mlx.config import load_preset
    from dh_mlx.torch.generate import greedy
    from dh_mlx.torch.moe import grouped_mm_available

    cuda = device == "cuda"
    config = load_preset(preset)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = twin.random_model(config, seed=0, device=device, dtype="bfloat16")
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    name = torch.cuda.get_device_name() if cuda else "CPU"
    setting = f"{preset} preset, random weights, bfloat16, batch 1, eager, {name}"

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    twin.generate_greedy(model, prompt, 8)  # warm-up: kernels, allocator
    for impl in ("auto", "grouped"):
        if impl == "grouped" and not grouped_mm_available(device, torch.bfloat16):
            continue
        model.set_experts_impl(impl)
        kernel = "sorted, one matmul per expert" if impl == "auto" else "sorted, one grouped GEMM"
        what = f"{setting}, {prompt_tokens}-token prompt, experts {kernel}"
        try:
            with torch.no_grad():
                model(prompt)
                s = timed(lambda: model(prompt))
        except RuntimeError as e:  # a grouped GEMM that refuses these shapes must not cost the other results
            emit(f"prefill_tokens_per_s_{impl}", None, "tokens/s", what, error=str(e).splitlines()[0])
            continue
        emit(f"prefill_tokens_per_s_{impl}", prompt_tokens / s, "tokens/s", what)
    model.set_experts_impl("auto")
    cache = twin.make_cache(config)
    token = greedy(twin.prefill(model, prompt, cache))

    def decode():
        nonlocal token
        for _ in range(decode_tokens):
            token = greedy(twin.decode_step(model, token, cache))

    s = timed(decode)
    emit("decode_tokens_per_s", decode_tokens / s, "tokens/s",
         f"{setting}, {decode_tokens} tokens after a {prompt_tokens}-token prompt, absorbed MLA on the latent "
         "cache, gathered expert weights")
    if cuda:
        emit("peak_gpu_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB", setting)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-preset", default="1b")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--parity-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        emit("cuda_twin", None, None, None, skipped="torch is not installed")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        emit("cuda_twin", None, None, None, skipped="no CUDA device (torch.cuda.is_available() is False)")
        return 0
    twin, has_mlx = import_twin()
    parity(twin, has_mlx, args.parity_tokens, args.device)
    speed(twin, args.decode_preset, args.prompt_tokens, args.decode_tokens, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
