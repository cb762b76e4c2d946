"""The `dh-mlx` command: each command maps its options onto one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, help="Darkhorse Genesis on MLX: a DeepSeek-V3-style MoE with latent attention.")


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _config(params: Optional[str], model: Optional[Path]):
    from .config import DEFAULT_PRESET, load_config, load_preset
    if params and model:
        _fail("give either --params or --model, not both")
    return load_config(model) if model else load_preset(params or DEFAULT_PRESET)


@app.command()
def info(params: Optional[str] = typer.Option(None, help="size preset (tiny, 1b, 5b, 30b, 500b)"),
         model: Optional[Path] = typer.Option(None, help="model directory with config.json"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Parameters (total/active/MTP), KV cache and weight memory, compared with dense models of similar size."""
    from .info import format_info, model_info
    config = _config(params, model)
    data = model_info(config)
    typer.echo(json.dumps(data) if as_json else format_info(data, str(model or f"preset {params or 'tiny'}")))


def main() -> None:
    """Console entry point: library errors become one-line messages, never tracebacks."""
    from .weights import CheckpointError
    try:
        app()
    except (CheckpointError, ValueError, MemoryError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
