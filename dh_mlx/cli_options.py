"""The options several commands share, declared once (typer `Annotated` aliases): each command's signature
names them with its own default, and they map onto the library's arguments (`SamplingOptions`, loading)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[Optional[Path], typer.Option(help="model directory (or hub repo id)")]
Params = Annotated[Optional[str], typer.Option(help="size preset with random weights (default tiny)")]
Dtype = Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 (default: by device)")]
Adapter = Annotated[Optional[Path], typer.Option(help="LoRA adapter directory, applied unfused")]
Bits = Annotated[Optional[int], typer.Option(help="quantize a float or FP8 model to this many bits as it loads (4 "
                                                  "or 8; also 2, 3, 5, 6)")]
GroupSize = Annotated[Optional[int], typer.Option(help="with --bits: values sharing a scale and bias (default: per "
                                                        "matrix, the largest of 128/64/32 dividing its width)")]

Temp = Annotated[float, typer.Option(help="sampling temperature; 0 is greedy")]
TopP = Annotated[float, typer.Option(help="nucleus sampling mass")]
TopK = Annotated[int, typer.Option(help="keep the k most likely tokens (0: off)")]
MinP = Annotated[float, typer.Option(help="drop tokens below min_p x the top probability")]
RepetitionPenalty = Annotated[float, typer.Option(help="penalise recently seen tokens (1: off)")]
Seed = Annotated[int, typer.Option(help="sampling seed, and the init seed with --params")]
Domain = Annotated[Optional[str], typer.Option(help="route through this domain's experts (auto: the domain the "
                                                    "prompt is likeliest under)")]
Mtp = Annotated[Optional[bool], typer.Option("--mtp/--no-mtp", help="MTP self-speculative decoding (default: on "
                                                                     "if the model has a module)")]
Verbose = Annotated[bool, typer.Option("--verbose", help="also print what MTP drafting measured")]
TemplateArgs = Annotated[Optional[str], typer.Option(help="a JSON object a tokenizer.json chat template is rendered "
                                                          "with, e.g. '{\"enable_thinking\": false}'")]

Out = Annotated[Path, typer.Option(help="directory to write")]
Force = Annotated[bool, typer.Option(help="write over an existing, non-empty output")]
ForceRun = Annotated[bool, typer.Option(help="start afresh in an --out that already holds files")]
Resume = Annotated[bool, typer.Option(help="continue the run in --out from its latest checkpoint")]


def sampling(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None):
    """The command line's sampling options as the library's one sampling object."""
    from .generation.options import SamplingOptions
    return SamplingOptions(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                           seed=seed)
