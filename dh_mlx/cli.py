"""The `dh-mlx` command: each command maps its options onto one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_convert import (MTP_HELP, QBITS_HELP, QDTYPE_HELP, QGROUP_HELP, RECIPE_HELP, convert_app,
                          wrote)
from .cli_generate import _domain, _generate, _load_for_generation, _read_prompt, _report, _stream

app = typer.Typer(add_completion=False, help="Darkhorse Genesis on MLX: a DeepSeek-V3-style MoE with latent attention.")


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context,
         prompt: Optional[str] = typer.Option(None, help="generate from this prompt on the default preset "
                                                          "(the seed's bare form)")) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if prompt is None:
        typer.echo(ctx.get_help())
        return
    _generate(prompt=prompt)


BITS_HELP = "quantize a float or FP8 model to this many bits as it loads (4 or 8; also 2, 3, 5, 6)"


@app.command()
def generate(prompt: Optional[str] = typer.Option(None, help="the prompt text; - reads it from standard input"),
             prompt_file: Optional[Path] = typer.Option(None, help="read the prompt from this UTF-8 file"),
             model: Optional[Path] = typer.Option(None, help="model directory (or hub repo id)"),
             params: Optional[str] = typer.Option(None, help="size preset with random weights (default tiny)"),
             max_tokens: int = typer.Option(100, help="stop after this many new tokens"),
             temp: float = typer.Option(0.0, help="sampling temperature; 0 is greedy"),
             top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
             top_k: int = typer.Option(0, help="keep the k most likely tokens (0: off)"),
             min_p: float = typer.Option(0.0, help="drop tokens below min_p x the top probability"),
             repetition_penalty: float = typer.Option(1.0, help="penalise recently seen tokens (1: off)"),
             seed: int = typer.Option(0, help="sampling seed, and the init seed with --params"),
             domain: Optional[str] = typer.Option(None, help="route through this domain's experts (auto: the "
                                                             "domain the prompt is likeliest under)"),
             mtp: Optional[bool] = typer.Option(None, "--mtp/--no-mtp",
                                                help="MTP self-speculative decoding (default: on if present)"),
             prefill_step_size: int = typer.Option(512, help="prompt tokens per prefill chunk"),
             dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: by device)"),
             adapter: Optional[Path] = typer.Option(None, help="LoRA adapter directory, applied unfused"),
             stream: bool = typer.Option(True, "--stream/--no-stream", help="print tokens as they come"),
             chat: bool = typer.Option(False, "--chat", help="apply the model's chat template to the prompt"),
             system: Optional[str] = typer.Option(None, help="with --chat: the system message"),
             bits: Optional[int] = typer.Option(None, help=BITS_HELP),
             group_size: int = typer.Option(64, help="with --bits: values sharing a scale and bias"),
             pipeline: bool = typer.Option(False, "--pipeline", help="under mlx.launch: split the decoder layers "
                                                                     "over the ranks, each loading only its own")
             ) -> None:
    """Generate text; stdout carries the text alone, speed and memory go to stderr."""
    _generate(prompt=_read_prompt(prompt, prompt_file), model=model, params=params, max_tokens=max_tokens, temp=temp, top_p=top_p,
              top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, domain=domain, mtp=mtp,
              prefill_step_size=prefill_step_size, dtype=dtype, adapter=adapter, stream=stream, chat=chat,
              system=system, bits=bits, group_size=group_size, pipeline=pipeline)


@app.command("chat")
def chat_command(model: Optional[Path] = typer.Option(None, help="model directory (or hub repo id)"),
                 params: Optional[str] = typer.Option(None, help="size preset with random weights (default tiny)"),
                 system: Optional[str] = typer.Option(None, help="the system message"),
                 max_tokens: int = typer.Option(256, help="stop each reply after this many tokens"),
                 temp: float = typer.Option(0.0, help="sampling temperature; 0 is greedy"),
                 top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
                 repetition_penalty: float = typer.Option(1.0, help="penalise recently seen tokens (1: off)"),
                 seed: int = typer.Option(0, help="sampling seed, and the init seed with --params"),
                 domain: Optional[str] = typer.Option(None, help="route through this domain's experts (auto: "
                                                                 "inferred from the first turn)"),
                 mtp: Optional[bool] = typer.Option(None, "--mtp/--no-mtp", help="MTP self-speculative decoding"),
                 dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: by device)"),
                 adapter: Optional[Path] = typer.Option(None, help="LoRA adapter directory, applied unfused"),
                 bits: Optional[int] = typer.Option(None, help=BITS_HELP),
                 group_size: int = typer.Option(64, help="with --bits: values sharing a scale and bias")) -> None:
    """A multi-turn chat on standard input, one user turn per line; the KV cache carries over between turns."""
    from .generation import GenerationStats
    from .generation.chat import Conversation
    m, tok = _load_for_generation(model, params, seed, dtype, adapter, bits, group_size)
    conversation = Conversation(m, tok, system=system)
    dom = _domain(m, domain)
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        stats = GenerationStats()
        _stream(conversation.reply(line.rstrip("\n"), stats=stats, max_tokens=max_tokens, temp=temp, top_p=top_p,
                                   repetition_penalty=repetition_penalty, seed=seed, domain=dom, mtp=mtp), True)
        _report(stats)


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
    config = resolve_config(params, model, flag="--model")
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
    typer.echo(f"wrote {out}: vocabulary {tok.vocab_size} (pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id})")


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
def quantize(model: Path = typer.Option(..., help="float model directory"),
             out: Path = typer.Option(..., help="directory for the quantized model"),
             bits: int = typer.Option(4, help=QBITS_HELP),
             group_size: int = typer.Option(64, help=QGROUP_HELP),
             recipe: str = typer.Option("uniform", help=RECIPE_HELP),
             mtp: bool = typer.Option(True, "--mtp/--no-mtp", help=MTP_HELP),
             dtype: Optional[str] = typer.Option(None, help=QDTYPE_HELP),
             force: bool = typer.Option(False, help="write over an existing, non-empty output")) -> None:
    """Write an MLX-quantized copy of a model directory (config.json `quantization` block, as mlx-lm writes it),
    one decoder layer in memory at a time."""
    from .checkpoint.quantized import quantize as run
    wrote(out, run(model, out, bits=bits, group_size=group_size, recipe=recipe, mtp=mtp, dtype=dtype,
                    force=force))


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


def main() -> None:
    """Console entry point: library errors become one-line messages, never tracebacks."""
    from .checkpoint.layout import CheckpointError
    import os
    debug = os.environ.get("DH_MLX_DEBUG", "") not in ("", "0")
    try:
        code = app(standalone_mode=False)
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
        typer.echo(f"error: {e}", err=True)
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
