"""What `dh-mlx generate` and `dh-mlx chat` share: loading (one process or a pipeline rank), streaming the
text, the stats line, reading the prompt; and the one-line failure every command uses."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@dataclass
class Loading:
    """What generate, chat and serve load: a model directory or hub id, or a preset with random weights."""

    model: Optional[Path] = None
    params: Optional[str] = None
    seed: int = 0  # the random weights' seed (with `params`)
    dtype: Optional[str] = None
    adapter: Optional[Path] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None  # None: per matrix (quant.QuantConfig)


def _load_for_generation(load: Loading):
    from .api import load as load_dir, load_preset_model
    from .config import DEFAULT_PRESET
    if load.params and load.model:
        _fail("give either --params or --model, not both")
    if load.model:
        m, tok = load_dir(load.model, dtype=load.dtype, bits=load.bits, group_size=load.group_size)
    else:
        m, tok = load_preset_model(load.params or DEFAULT_PRESET, seed=load.seed, dtype=load.dtype, bits=load.bits,
                                   group_size=load.group_size)
    if load.adapter:
        from .lora import load_adapters
        load_adapters(m, load.adapter)
    if tok is None:
        _fail(f"{load.model}: no tokenizer.model or tokenizer.json in the model directory")
    return m, tok


def _template_args(text: Optional[str]) -> dict:
    """--chat-template-args: a JSON object (its keys are the chat template's variables)."""
    if not text:
        return {}
    import json
    try:
        args = json.loads(text)
    except ValueError as e:
        _fail(f"--chat-template-args: not JSON ({e})")
    if not isinstance(args, dict):
        _fail("--chat-template-args: expected a JSON object, e.g. '{\"enable_thinking\": false}'")
    return args


def _domain(m, domain: Optional[str]):
    """The domain id for --domain NAME, "auto" as it is (inferred from the prompt), None without."""
    if not domain:
        return None
    if m.config.domain_routing is None:
        _fail("--domain needs a model with a domain_routing block in its config.json")
    return "auto" if domain == "auto" else m.config.domain_routing.domain_id(domain)


def _stream(responses, stream: bool, stats, verbose: bool = False) -> str:
    """Write the pieces to stdout as they come (or all at the end), then a newline and the stats line on
    stderr; returns the text. Ctrl-C ends the text where it stands, still with the newline and the stats,
    then exits 130."""
    pieces: list[str] = []
    interrupted = False
    try:
        for r in responses:
            pieces.append(r.text)
            if stream:
                sys.stdout.write(r.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        responses.close()
    sys.stdout.write(("" if stream else "".join(pieces)) + "\n")
    sys.stdout.flush()
    _report(stats, verbose)
    if interrupted:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    return "".join(pieces)


def _report(stats, verbose: bool = False) -> None:
    typer.echo(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens/s | generation: "
               f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s | peak memory "
               f"{stats.peak_memory_gb:.2f} GB", err=True)
    if stats.domain_posterior is not None:
        ranked = sorted(stats.domain_posterior.items(), key=lambda kv: -kv[1])
        typer.echo(f"domain auto: {ranked[0][0]} (posterior {ranked[0][1]:.2f}; then "
                   + ", ".join(f"{n} {p:.2f}" for n, p in ranked[1:3]) + ")", err=True)
    if stats.acceptance_rate is not None and (stats.drafting_paid or verbose):
        typer.echo(f"MTP draft acceptance: {stats.accepted}/{stats.drafted} = {stats.acceptance_rate:.1%} "
                   f"({stats.draft_summary})", err=True)


def _generate(*, prompt: str, load: Loading, sampling, max_tokens: int = 100, domain: Optional[str] = None,
              mtp: Optional[bool] = None, prefill_step_size: int = 512, stream: bool = True, chat: bool = False,
              system: Optional[str] = None, pipeline: bool = False, verbose: bool = False,
              template_args: Optional[dict] = None) -> None:
    from .chat import messages
    from .generation import GenerationStats, stream_generate
    if (system or template_args) and not chat:
        _fail("--system and --chat-template-args need --chat (they go to the chat template)")
    m, tok = _load_pipelined(load, mtp) if pipeline else _load_for_generation(load)
    ids = tok.encode_chat(messages(prompt, system), limit=m.config.max_position_embeddings,
                          **(template_args or {})) if chat else prompt
    stats = GenerationStats()
    pieces = stream_generate(m, tok, ids, sampling=sampling, max_tokens=max_tokens, domain=_domain(m, domain),
                             prefill_step_size=prefill_step_size, stats=stats, mtp=mtp)
    if pipeline and m.rank != 0:  # every rank runs the loop; rank 0 alone prints
        for _ in pieces:
            pass
        return
    _stream(pieces, stream, stats, verbose)


def _load_pipelined(load: Loading, mtp: Optional[bool]):
    from .api import load_pipelined
    from .files import format_bytes
    from mlx.utils import tree_flatten
    if load.params or not load.model or load.adapter or load.bits or mtp:
        _fail("--pipeline runs a model directory (--model) as it is: no --params, --adapter, --bits or --mtp")
    m, tok = load_pipelined(load.model, dtype=load.dtype)
    if tok is None:
        _fail(f"{load.model}: no tokenizer.model or tokenizer.json in the model directory")
    held = sum(v.nbytes for _, v in tree_flatten(m.inner.parameters()))
    typer.echo(f"pipeline rank {m.rank} of {m.size}: decoder layers {m.own.start}-{m.own.stop - 1}, weights "
               f"{format_bytes(held)} ({held} bytes)", err=True)
    return m, tok


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt from --prompt (`-`: standard input) or --prompt-file, as valid UTF-8 text."""
    from .files import LIMITS, read_bytes
    if (prompt is None) == (prompt_file is None):
        _fail("give the prompt with --prompt TEXT (or - for standard input) or --prompt-file PATH")
    where = f"--prompt-file {prompt_file}" if prompt_file else "standard input" if prompt == "-" else "--prompt"
    if prompt_file is not None or prompt == "-":
        data = read_bytes(prompt_file, "prompt") if prompt_file else sys.stdin.buffer.read(LIMITS["prompt"] + 1)
        if len(data) > LIMITS["prompt"]:
            _fail(f"{where}: more than {LIMITS['prompt']:,} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(f"{where}: byte 0x{data[e.start]:02X} at offset {e.start} is not UTF-8")
    for i, ch in enumerate(prompt):  # undecodable argument bytes arrive as U+DC80..U+DCFF (surrogateescape)
        if 0xD800 <= ord(ch) <= 0xDFFF:
            byte = f"byte 0x{ord(ch) - 0xDC00:02X}" if ord(ch) >= 0xDC80 else f"U+{ord(ch):04X}"
            _fail(f"{where}: {byte} at offset {i} is not UTF-8 text")
    return prompt
