#!/usr/bin/env python
"""The seed's GGUF converter, kept as a thin wrapper: the work is dh_mlx.convert.export_gguf.

    python convert/convert_to_gguf.py --model-dir runs/tiny --out tiny.gguf [--outtype f16] [--quantize Q4_K_M]

(the same as `dh-mlx convert gguf --model runs/tiny --out tiny.gguf ...`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a dh-mlx model directory as a llama.cpp GGUF file.")
    parser.add_argument("--model-dir", required=True, help="model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--quantize", default=None, choices=["Q4_K_M", "Q5_K_M", "Q8_0"],
                        help="then run llama.cpp's quantizer (needs llama-cpp-python)")
    parser.add_argument("--no-mtp", action="store_true", help="leave the MTP layers out")
    args = parser.parse_args(argv)
    try:
        from dh_mlx.convert import export_gguf
        path = export_gguf(args.model_dir, args.out, outtype=args.outtype, quantize=args.quantize,
                           mtp=not args.no_mtp)
    except (ValueError, MemoryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}: {args.quantize or args.outtype} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
