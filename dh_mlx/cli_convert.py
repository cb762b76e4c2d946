"""The `dh-mlx convert` commands (GGUF, mlx-lm, HF/vLLM, PyTorch imports): each maps onto one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

QBITS_HELP = "bits per weight: 4 or 8 (also 2, 3, 5, 6)"
QGROUP_HELP = "values sharing a scale and bias: 32, 64 or 128"
RECIPE_HELP = "uniform, or mixed (8 bits for lm_head, embedding, first and last layers)"
MTP_HELP = "keep the MTP modules (mlx-lm cannot load them)"
QDTYPE_HELP = "float32, bfloat16 or float16 for the scales and unquantized tensors (default: the source's)"


def wrote(out: Path, s: dict) -> None:
    """The summary line of a quantized copy."""
    typer.echo(f"wrote {out}: {s['bits_per_weight']:.2f} bits per weight, {s['bytes'] / 1e6:.1f} MB "
               f"(from {s['source_bytes'] / 1e6:.1f} MB)", err=True)


convert_app = typer.Typer(add_completion=False, help="Convert to GGUF (llama.cpp), mlx-lm's quantized format or an "
                                                     "HF/vLLM directory, or import PyTorch weights.")


@convert_app.command("gguf")
def convert_gguf(model: Path = typer.Option(..., help="model directory (config.json, safetensors, tokenizer.model)"),
                 out: Path = typer.Option(..., help="the .gguf file to write"),
                 outtype: str = typer.Option("f16", help="f32, f16, bf16 or q8_0 (the quantizer's input with "
                                                         "--quantize)"),
                 quantize: Optional[str] = typer.Option(None, help="Q4_K_M, Q5_K_M or Q8_0 with llama.cpp's own "
                                                                  "quantizer (needs llama-cpp-python)"),
                 mtp: bool = typer.Option(True, "--mtp/--no-mtp", help="write the MTP layers (llama.cpp nextn)"),
                 force: bool = typer.Option(False, help="replace an existing --out file")) -> None:
    """Write a GGUF file for llama.cpp's deepseek2 architecture."""
    from .convert import export_gguf
    path = export_gguf(model, out, outtype=outtype, quantize=quantize, mtp=mtp, force=force)
    typer.echo(f"wrote {path}: {quantize or outtype} ({path.stat().st_size / 1e6:.1f} MB)", err=True)


@convert_app.command("hf")
def convert_hf(model: Path = typer.Option(..., help="model directory"),
               out: Path = typer.Option(..., help="output directory (transformers / vLLM)"),
               mtp: bool = typer.Option(True, "--mtp/--no-mtp", help="keep the MTP layers (vLLM speculative "
                                                                     "decoding)"),
               dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: as stored)"),
               shard_gb: float = typer.Option(5.0, help="maximum safetensors shard size in GB"),
               force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Write a Hugging Face DeepseekV3ForCausalLM directory: sharded safetensors, tokenizer, generation config."""
    from .convert import export_hf
    export_hf(model, out, mtp=mtp, dtype=dtype, max_shard_bytes=int(shard_gb * 1e9), force=force)
    typer.echo(f"wrote {out}", err=True)


@convert_app.command("import")
def convert_import(input: Path = typer.Option(..., help=".pt/.bin state_dict, .safetensors, TorchScript .pt/.ot, "
                                                        "or torch.export .pt2"),
                   config: Optional[Path] = typer.Option(None, help="config.json (a .pt2 carries its own)"),
                   out: Path = typer.Option(..., help="model directory to write"),
                   tokenizer: Optional[Path] = typer.Option(None, help="directory whose tokenizer to copy along"),
                   dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: as "
                                                                  "stored)"),
                   trust_code: bool = typer.Option(False, help="read TorchScript / torch.export archives with "
                                                               "PyTorch's loaders, which RUN CODE from the file: "
                                                               "only for a file you trust"),
                   force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Import PyTorch weights (our names or DeepSeek's official ones) as a model directory; nothing in the file
    runs unless --trust-code."""
    from .convert import import_checkpoint
    import_checkpoint(input, out, config=config, tokenizer=tokenizer, dtype=dtype, trust_code=trust_code,
                      force=force)
    typer.echo(f"wrote {out}", err=True)
