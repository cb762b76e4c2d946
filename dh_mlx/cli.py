"""The `dh-mlx` command: each command maps its options onto one library call."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_convert import (MTP_HELP, QBITS_HELP, QDTYPE_HELP, QGROUP_HELP, RECIPE_HELP, convert_app,
                          wrote)
from . import cli_options as o
from .cli_generate import (Loading, _domain, _fail, _generate, _load_for_generation, _read_prompt, _stream,
                           _template_args)

app = typer.Typer(add_completion=False, help="Darkhorse Genesis on MLX: a DeepSeek-V3-style MoE with latent attention.")


def _version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"dh-mlx {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context,
         prompt: Optional[str] = typer.Option(None, help="generate from this prompt on the default preset "
                                                          "(short for dh-mlx generate --prompt)"),
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if prompt is None:
        typer.echo(ctx.get_help())
        return
    _generate(prompt=prompt, load=Loading(), sampling=o.sampling(seed=0))


BITS_HELP = "quantize a float or FP8 model to this many bits as it loads (4 or 8; also 2, 3, 5, 6)"


@app.command()
def generate(prompt: Optional[str] = typer.Option(None, help="the prompt text; - reads it from standard input"),
             prompt_file: Optional[Path] = typer.Option(None, help="read the prompt from this UTF-8 file"),
             model: o.Model = None, params: o.Params = None,
             max_tokens: int = typer.Option(100, help="stop after this many new tokens"),
             temp: o.Temp = 0.0, top_p: o.TopP = 1.0, top_k: o.TopK = 0, min_p: o.MinP = 0.0,
             repetition_penalty: o.RepetitionPenalty = 1.0, seed: o.Seed = 0, domain: o.Domain = None,
             mtp: o.Mtp = None, prefill_step_size: int = typer.Option(512, help="prompt tokens per prefill chunk"),
             dtype: o.Dtype = None, adapter: o.Adapter = None,
             stream: bool = typer.Option(True, "--stream/--no-stream", help="print tokens as they come"),
             chat: bool = typer.Option(False, "--chat", help="apply the model's chat template to the prompt"),
             system: Optional[str] = typer.Option(None, help="with --chat: the system message"),
             chat_template_args: o.TemplateArgs = None, bits: o.Bits = None, group_size: o.GroupSize = 64,
             pipeline: bool = typer.Option(False, "--pipeline", help="under mlx.launch: split the decoder layers "
                                                                     "over the ranks, each loading only its own"),
             verbose: o.Verbose = False) -> None:
    """Generate text; stdout carries the text alone, speed and memory go to stderr."""
    _generate(prompt=_read_prompt(prompt, prompt_file), load=Loading(model, params, seed, dtype, adapter, bits,
                                                                     group_size),
              sampling=o.sampling(temp, top_p, top_k, min_p, repetition_penalty, seed), max_tokens=max_tokens,
              domain=domain, mtp=mtp, prefill_step_size=prefill_step_size, stream=stream, chat=chat, system=system,
              pipeline=pipeline, verbose=verbose, template_args=_template_args(chat_template_args))


@app.command("chat")
def chat_command(model: o.Model = None, params: o.Params = None,
                 system: Optional[str] = typer.Option(None, help="the system message"),
                 chat_template_args: o.TemplateArgs = None,
                 max_tokens: int = typer.Option(256, help="stop each reply after this many tokens"),
                 temp: o.Temp = 0.0, top_p: o.TopP = 1.0, top_k: o.TopK = 0, min_p: o.MinP = 0.0,
                 repetition_penalty: o.RepetitionPenalty = 1.0, seed: o.Seed = 0, domain: o.Domain = None,
                 mtp: o.Mtp = None, dtype: o.Dtype = None, adapter: o.Adapter = None, bits: o.Bits = None,
                 group_size: o.GroupSize = 64, verbose: o.Verbose = False) -> None:
    """A multi-turn chat on standard input, one user turn per line; the KV cache carries over between turns.
    Piped, each reply is followed by an empty line."""
    from .files import LIMITS
    from .generation import GenerationStats
    from .generation.chat import Conversation
    m, tok = _load_for_generation(Loading(model, params, seed, dtype, adapter, bits, group_size))
    conversation = Conversation(m, tok, system=system, template_args=_template_args(chat_template_args))
    options = dict(sampling=o.sampling(temp, top_p, top_k, min_p, repetition_penalty, seed), max_tokens=max_tokens,
                   domain=_domain(m, domain), mtp=mtp)
    number = 0
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            raw = sys.stdin.buffer.readline(LIMITS["prompt"])
        except KeyboardInterrupt:
            typer.echo("", err=True)
            raise typer.Exit(130)
        if not raw:
            break
        number += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(f"standard input, line {number}: byte 0x{raw[e.start]:02X} at offset {e.start} is not UTF-8")
        if not line.strip():
            continue
        stats = GenerationStats()
        _stream(conversation.reply(line.rstrip("\n"), stats=stats, **options), True, stats, verbose)
        if not sys.stdout.isatty():  # replies apart, even where one holds line breaks of its own
            sys.stdout.write("\n")
            sys.stdout.flush()


@app.command()
def serve(model: o.Model = None, params: o.Params = None,
          host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(8080, help="port to listen on (0: any free one)"),
          max_concurrency: int = typer.Option(16, help="sequences decoding together"),
          max_queue: int = typer.Option(64, help="requests waiting beyond them; more are answered 429"),
          prefill_chunk: int = typer.Option(512, help="prompt tokens per prefill chunk"),
          prefix_cache_gb: float = typer.Option(1.0, help="memory for reusable prompt prefixes, GB"),
          kv_budget_gb: Optional[float] = typer.Option(None, help="latent-cache memory admission may use, GB "
                                                                  "(default: half of what is free)"),
          api_key: Optional[str] = typer.Option(None, help="require this bearer token on /v1/"),
          model_name: Optional[str] = typer.Option(None, help="the name /v1/models lists (default: --model)"),
          dtype: o.Dtype = None, bits: o.Bits = None, group_size: o.GroupSize = 64, adapter: o.Adapter = None
          ) -> None:
    """An OpenAI-compatible server (chat and text completions, streaming, structured output, tool calls) that
    batches concurrent requests; Ctrl-C or SIGTERM finishes the requests in flight, then exits."""
    import logging

    from .serve import serve as run
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)

    def ready(bound: int) -> None:
        typer.echo(f"serving {model or f'preset {params or DEFAULT_PRESET}'} on http://{host}:{bound}/v1 "
                   f"(up to {max_concurrency} at once)", err=True)
    from .config import DEFAULT_PRESET
    run(model=model, params=params, host=host, port=port, max_concurrency=max_concurrency, max_queue=max_queue,
        prefill_chunk=prefill_chunk, prefix_cache_gb=prefix_cache_gb, kv_budget_gb=kv_budget_gb, api_key=api_key,
        model_name=model_name, dtype=dtype, bits=bits, group_size=group_size, adapter=adapter, on_ready=ready)


def _exit_if_stopped(signum: int | None) -> None:
    """A run stopped by a signal (after saving a checkpoint) exits 128 + the signal, saying how to continue."""
    if signum is None:
        return
    import shlex
    args = [a for a in sys.argv[1:] if a != "--force"]
    typer.echo("continue with: " + shlex.join(["dh-mlx", *args, *([] if "--resume" in args else ["--resume"])]),
               err=True)
    raise typer.Exit(128 + int(signum))


@app.command()
def info(params: Optional[str] = typer.Option(None, help="size preset (tiny, 1b, 5b, 30b, 500b)"),
         model: Optional[Path] = typer.Option(None, help="model directory with config.json"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
         plan: bool = typer.Option(False, "--plan", help="estimate layouts over several machines (training: "
                                                         "data-parallel, FSDP, pipeline; serving)"),
         machines: int = typer.Option(2, help="with --plan: how many machines"),
         memory: float = typer.Option(192.0, help="with --plan: memory per machine, GB"),
         link: str = typer.Option("thunderbolt5", help="with --plan: 10gbe, thunderbolt5, infiniband or nvlink")
         ) -> None:
    """Parameters (total/active/MTP), KV cache and weight memory, compared with dense models of similar size;
    with --plan, memory per rank and bytes per step of multi-machine layouts (estimates)."""
    from .info import format_info, model_info
    from .config import resolve_config
    config = resolve_config(params, model, arg="model")
    title = str(model or f"preset {params or 'tiny'}")
    if plan:
        from .plan import format_plan, plan as make_plan
        data = make_plan(config, machines=machines, memory_gb=memory, link=link)
        typer.echo(json.dumps(data) if as_json else format_plan(data, title))
        return
    data = model_info(config)
    typer.echo(json.dumps(data) if as_json else format_info(data, title))


tokenizer_app = typer.Typer(add_completion=False, help="Train a SentencePiece tokenizer.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(data: list[Path] = typer.Option(..., help="JSONL file or directory (repeatable)"),
                    out: Path = typer.Option(..., help="directory for tokenizer.model and the HF files"),
                    vocab_size: int = typer.Option(8192, help="vocabulary size (the model's vocab_size)"),
                    seed: int = typer.Option(0, help="training seed"),
                    force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Train a byte-fallback BPE tokenizer on the `text` of JSONL records; decode(encode(s)) == s for any s."""
    from .train.tokenizer import train_tokenizer
    tok = train_tokenizer(data, out, vocab_size=vocab_size, seed=seed, force=force)
    typer.echo(f"wrote {out}: vocabulary {tok.vocab_size} (pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id})",
               err=True)


data_app = typer.Typer(add_completion=False, help="Prepare training data: JSONL into memory-mapped token shards.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(data: list[str] = typer.Option(..., help="JSONL file, folder or glob (repeatable)"),
                 out: Path = typer.Option(..., help="directory for the shards (`train --data DIR` reads it)"),
                 tokenizer: Optional[Path] = typer.Option(None, help="tokenizer directory (default: the bundled "
                                                                     "one; the model's, to fine-tune it)"),
                 skip_invalid: bool = typer.Option(False, help="skip (and count) invalid JSONL lines instead of "
                                                               "failing"),
                 workers: Optional[int] = typer.Option(None, help="worker processes (default: one per core)"),
                 max_memory: float = typer.Option(1.5, help="GB of memory for all processes together"),
                 shard_mb: Optional[float] = typer.Option(None, help="MB of JSONL per shard (default: 1/256 of the "
                                                                     "input, 1 to 64 MB)"),
                 force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Tokenize JSONL once, on every core, into shards that training memory-maps (rerun an interrupted
    prepare to continue it)."""
    from .train.prepare import current_rss, describe_result, prepare
    r = prepare(data, out, tokenizer, skip_invalid=skip_invalid, workers=workers,
                max_memory=max_memory * 1e9 - current_rss(),  # (all processes: this one's own share included)
                chunk_bytes=int(shard_mb * 1e6) if shard_mb else None, force=force)
    typer.echo(describe_result(r), err=True)


def _default(name: str, lora: bool = False):
    from .config import LoRAConfig
    from .train.config import LORA_DEFAULTS, TrainConfig
    if lora and name in ("rank", "alpha", "dropout"):
        return getattr(LoRAConfig, name)
    return LORA_DEFAULTS[name] if lora and name in LORA_DEFAULTS else getattr(TrainConfig, name)


def _option(name: str, help: str, lora: bool = False):
    """A training option left unset unless given: the library's default (TrainConfig, LORA_DEFAULTS) applies."""
    return typer.Option(None, help=f"{help} (default {_default(name, lora)})", show_default=False)


def _given(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def train(params: Optional[str] = typer.Option(None, help="size preset (default tiny)"),
          config: Optional[Path] = typer.Option(None, help="a config.json instead of a preset"),
          data: Optional[Path] = typer.Option(None, help="JSONL file or directory (prepared once into a cache), "
                                                         "a prepared directory, or a mixture .json (default: the "
                                                         "bundled corpus)"),
          out: Optional[Path] = typer.Option(None, help="run directory (default runs/PRESET)"),
          tokenizer: Optional[Path] = typer.Option(None, help="tokenizer directory (default: the bundled one)"),
          init: Optional[Path] = typer.Option(None, help="start from this model directory's weights"),
          steps: Optional[int] = _option("steps", "optimizer steps"),
          batch_size: Optional[int] = _option("batch_size", "sequences per micro-batch"),
          seq_len: Optional[int] = _option("seq_len", "tokens per sequence"),
          grad_accum: Optional[int] = _option("grad_accum", "micro-batches per optimizer step"),
          lr: Optional[float] = _option("lr", "peak learning rate (AdamW, warmup then cosine)"),
          warmup: Optional[int] = _option("warmup_steps", "warmup steps"),
          seed: Optional[int] = _option("seed", "init, data order and split seed"),
          alf_gamma: Optional[float] = _option("alf_gamma", "auxiliary-loss-free bias step (0: off)"),
          balance_alpha: Optional[float] = _option("balance_alpha", "sequence-wise balance loss weight (0: off)"),
          mtp_lambda: Optional[float] = _option("mtp_lambda", "MTP loss weight"),
          mtp_distill: bool = typer.Option(False, help="train only the MTP module of --init (added when it has "
                                                       "none) towards the model's own next-token distribution: higher "
                                                       "acceptance for --mtp decoding (default --out "
                                                       "runs/NAME-mtp)"),
          eval_every: Optional[int] = _option("eval_every", "validate every N steps"),
          save_every: Optional[int] = _option("save_every", "checkpoint every N steps"),
          keep_checkpoints: Optional[int] = _option("keep_checkpoints", "keep the newest K checkpoints (each holds "
                                                    "weights and optimizer state: ~3x the model)"),
          skip_invalid: bool = typer.Option(False, help="skip (and count) invalid JSONL lines instead of failing"),
          resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
          force: bool = typer.Option(False, help="start afresh in an --out that already holds files")) -> None:
    """Train from domain-tagged JSONL with ALF balancing and MTP; --out becomes a loadable model directory."""
    from .train.run import describe, train as run
    result = run(params=params, config=config, data=data, out=out, tokenizer=tokenizer, init=init, resume=resume,
                 force=force, mtp_distill=mtp_distill, skip_invalid=skip_invalid,
                 **_given(steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
                          warmup_steps=warmup, seed=seed, alf_gamma=alf_gamma, balance_alpha=balance_alpha,
                          mtp_lambda=mtp_lambda, eval_every=eval_every, save_every=save_every,
                          keep_checkpoints=keep_checkpoints))
    if result.rank == 0:
        typer.echo(describe(result), err=True)
    _exit_if_stopped(result.signal)


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="a training run directory (holds metrics.jsonl)")) -> None:
    """Draw loss curves and the per-domain expert-load heatmap as PNG files in the run directory."""
    from .train.plot import plot_run
    for p in plot_run(run_dir):
        typer.echo(str(p))


@app.command()
def quantize(model: Path = typer.Option(..., help="model directory or hub repo id (float or FP8)"),
             out: Path = typer.Option(..., help="directory for the quantized model"),
             bits: int = typer.Option(4, help=QBITS_HELP),
             group_size: int = typer.Option(64, help=QGROUP_HELP),
             recipe: str = typer.Option("uniform", help=RECIPE_HELP),
             mtp: bool = typer.Option(True, "--mtp/--no-mtp", help=MTP_HELP),
             dtype: Optional[str] = typer.Option(None, help=QDTYPE_HELP),
             force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Write an MLX-quantized copy of a model directory in mlx-lm's format, one decoder layer in memory at a
    time (`convert mlx` is the same command; mlx-lm loads a copy written with --no-mtp)."""
    from .convert.mlx import quantize as run
    wrote(out, run(model, out, bits=bits, group_size=group_size, recipe=recipe, mtp=mtp, dtype=dtype,
                    force=force))


convert_app.command("mlx")(quantize)


@app.command()
def lora(model: Path = typer.Option(..., help="base model directory (float, or quantized for QLoRA)"),
         data: Path = typer.Option(..., help="JSONL (text, prompt/completion or messages), a "
                                              "prepared directory or a mixture .json"),
         out: Path = typer.Option(Path("runs/lora"), help="run directory: adapters.safetensors, "
                                                         "adapter_config.json, checkpoints"),
         tokenizer: Optional[Path] = typer.Option(None, help="tokenizer directory (default: the model's)"),
         rank: Optional[int] = _option("rank", "adapter rank r", lora=True),
         alpha: Optional[float] = _option("alpha", "adapter scale is alpha / rank", lora=True),
         dropout: Optional[float] = _option("dropout", "dropout on the adapters' input", lora=True),
         targets: Optional[list[str]] = typer.Option(None, help="q_proj q_a_proj q_b_proj kv_a_proj_with_mqa "
                                                               "kv_b_proj o_proj shared_experts gate_proj "
                                                               "up_proj down_proj (repeatable; default: query, "
                                                               "kv_a, o_proj, shared experts)"),
         num_layers: Optional[int] = typer.Option(None, help="adapt only the last N decoder layers"),
         experts: bool = typer.Option(True, "--experts/--no-experts", help="per-expert adapters on the routed "
                                                                          "experts"),
         steps: Optional[int] = _option("steps", "optimizer steps", lora=True),
         batch_size: Optional[int] = _option("batch_size", "sequences per batch", lora=True),
         seq_len: Optional[int] = _option("seq_len", "tokens per sequence", lora=True),
         lr: Optional[float] = _option("lr", "peak learning rate", lora=True),
         warmup: Optional[int] = _option("warmup_steps", "warmup steps", lora=True),
         grad_checkpoint: bool = typer.Option(False, help="recompute layers in the backward pass (less memory)"),
         bits: Optional[int] = typer.Option(None, help=BITS_HELP + " (QLoRA)"),
         group_size: int = typer.Option(64, help="with --bits: values sharing a scale and bias"),
         eval_every: Optional[int] = _option("eval_every", "validate every N steps", lora=True),
         save_every: Optional[int] = _option("save_every", "checkpoint (and write the adapters) every N steps",
                                             lora=True),
         keep_checkpoints: Optional[int] = _option("keep_checkpoints", "keep the newest K checkpoints", lora=True),
         seed: Optional[int] = _option("seed", "adapter init, data order and split seed", lora=True),
         resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
         force: bool = typer.Option(False, help="start afresh in an --out that already holds files")) -> None:
    """Fine-tune LoRA adapters (QLoRA on a quantized model) with the training loop of `train`."""
    from .train.lora_run import describe, lora as run
    result = run(model=model, data=data, out=out, tokenizer=tokenizer, num_layers=num_layers, experts=experts,
                 targets=[t for item in targets or [] for t in item.split(",") if t] or None,
                 grad_checkpointing=grad_checkpoint, resume=resume, force=force, bits=bits, group_size=group_size,
                 **_given(rank=rank, alpha=alpha, dropout=dropout, seed=seed, steps=steps, batch_size=batch_size,
                          seq_len=seq_len, lr=lr, warmup_steps=warmup, eval_every=eval_every, save_every=save_every,
                          keep_checkpoints=keep_checkpoints))
    if result.run.rank == 0:
        typer.echo(describe(result), err=True)
    _exit_if_stopped(result.run.signal)


@app.command()
def fuse(model: Path = typer.Option(..., help="base model directory"),
         adapter: Path = typer.Option(..., help="adapter directory (adapters.safetensors + adapter_config.json)"),
         out: Path = typer.Option(..., help="directory for the fused model"),
         keep_quantized: bool = typer.Option(False, help="re-quantize the adapted matrices of a quantized base "
                                                         "instead of writing a float model"),
         force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Merge LoRA adapters into the base weights: a plain model directory with the adapted model's logits."""
    from .train.lora_run import fuse as run
    run(model=model, adapter=adapter, out=out, keep_quantized=keep_quantized, force=force)
    typer.echo(f"wrote {out}", err=True)


app.add_typer(convert_app, name="convert")
domains_app = typer.Typer(add_completion=False, help="A model's domains as parts: extract one as a standalone "
                                                     "DeepSeek-V3, or remove one.")
app.add_typer(domains_app, name="domains")


@domains_app.command("extract")
def domains_extract(model: Path = typer.Option(..., help="model directory with a domain_routing block"),
                    name: str = typer.Option(..., help="the domain to extract"),
                    out: Path = typer.Option(..., help="directory for the standalone model"),
                    force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Write one domain's experts and the common ones as a plain DeepSeek-V3 (the full model's logits with
    that domain's id)."""
    from .checkpoint.domains import extract_domain
    m = extract_domain(model, name, out, force=force)
    typer.echo(f"wrote {out}: domain {name!r}, {m.config.n_routed_experts} routed experts", err=True)


@domains_app.command("add")
def domains_add(model: Path = typer.Option(..., help="model directory with a domain_routing block"),
                name: str = typer.Option(..., help="the new domain's name"),
                data: Path = typer.Option(..., help="JSONL or prepared directory of the new domain "
                                                     "(every record trained as it)"),
                out: Path = typer.Option(..., help="run directory: the model with the domain added"),
                steps: Optional[int] = _option("steps", "optimizer steps"),
                batch_size: Optional[int] = _option("batch_size", "sequences per batch"),
                seq_len: Optional[int] = _option("seq_len", "tokens per sequence"),
                lr: Optional[float] = _option("lr", "peak learning rate"),
                seed: Optional[int] = _option("seed", "data order and split seed"),
                resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
                force: bool = typer.Option(False, help="start afresh in an --out that already holds files")) -> None:
    """Add a domain: new experts (and their router rows) trained on its data; every other weight unchanged."""
    from .train.domain_add import add_domain
    from .train.run import describe
    r = add_domain(model=model, name=name, data=data, out=out, resume=resume, force=force,
                   **_given(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed))
    if r.run.rank == 0:
        change = f"; {name} validation loss {r.before:.3f} -> {r.after:.3f}" if r.before is not None else ""
        typer.echo(describe(r.run) + change, err=True)
    _exit_if_stopped(r.run.signal)


@domains_app.command("remove")
def domains_remove(model: Path = typer.Option(..., help="model directory with a domain_routing block"),
                   name: str = typer.Option(..., help="the domain to remove"),
                   out: Path = typer.Option(..., help="directory for the model without it"),
                   force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Write the model without one domain and its experts (the other domains route as before)."""
    from .checkpoint.domains import remove_domain
    m = remove_domain(model, name, out, force=force)
    typer.echo(f"wrote {out}: without {name!r}, {m.config.n_routed_experts} routed experts", err=True)


def _command():
    """The click command of `app`, with flags shown without a `<bool>` type in help."""
    import click
    from typer.main import get_command
    root_command = get_command(app)

    def walk(command) -> None:
        for param in [*command.params, command.get_help_option(click.Context(command))]:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        for sub in getattr(command, "commands", {}).values():
            walk(sub)
    walk(root_command)
    return root_command


# Library arguments whose errors the command line words as its flags ("temp must be" -> "--temp must be").
FLAGS = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens", "prefill_step_size")
# A library message names an argument in backquotes: `out`, `force=True`, `bits=4`, `domain="auto"`.
ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)(?:=(True|\"[^\"`]*\"|[^`\s]*))?`")


def as_flags(text: str) -> str:
    """A library message in the command line's words: `force=True` -> --force, `mtp=False` -> --no-mtp,
    `bits=4` -> --bits 4, `domain="auto"` -> --domain auto, `out` -> --out."""
    def flag(m: re.Match) -> str:
        name, value = m.group(1).replace("_", "-"), m.group(2)
        if value == "False":
            return f"--no-{name}"
        return f"--{name}" if value in (None, "True") else f"--{name} {value.strip(chr(34))}"
    return ARGUMENT.sub(flag, text)


def _message(e: BaseException) -> str:
    """The error's own words (a library argument named as its flag); an out-of-memory error, which often has
    none, says so and what is free."""
    text = as_flags(str(e).strip())
    first = text.split(" ", 1)[0]
    if first in FLAGS and text.startswith(f"{first} must be"):
        text = "--" + first.replace("_", "-") + text[len(first):]
    if isinstance(e, MemoryError) and not text or any(w in text.lower() for w in ("unable to allocate",
                                                                               "out of memory")):
        from .device import available_memory
        from .files import format_bytes
        return (f"out of memory{': ' + text if text else ''} ({format_bytes(available_memory())} available now; a "
                "smaller model, --bits 4, a smaller --batch-size or a shorter prompt needs less)")
    return text or type(e).__name__


def main() -> None:
    """Console entry point: library errors become one-line messages, never tracebacks."""
    from .checkpoint.layout import CheckpointError
    from .progress import show_progress
    from .train.report import show_training
    import os
    debug = os.environ.get("DH_MLX_DEBUG", "") not in ("", "0")
    show_progress(words=as_flags)
    show_training(words=as_flags)
    try:
        code = _command()(standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.TyperException as e:  # a usage error: unknown command, bad option or value
        ctx = getattr(e, "ctx", None)
        typer.echo(f"error: {getattr(e, 'format_message', e.__str__)()}"
                   + (f" (see {ctx.command_path} --help)" if ctx is not None else ""), err=True)
        code = getattr(e, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        code = 130
    except (CheckpointError, ValueError, MemoryError, OSError, RuntimeError) as e:
        if debug:
            raise
        typer.echo(f"error: {_message(e)}", err=True)
        code = 1
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if debug:
            raise
        typer.echo(f"error: internal error {type(e).__name__}: {e} (DH_MLX_DEBUG=1 shows the traceback)",
                   err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
