"""`dh-mlx train` as a library call: a preset or config, a JSONL file or directory, a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from ..config_v4 import refuse
from ..config import DATA_DIR, DEFAULT_PRESET, load_config, resolve_config
from ..device import compute_dtype
from ..files import write_atomic
from ..params import count_params
from ..checkpoint.weights import copy_tokenizer, load_model, random_model, save_model, with_mtp_module
from .config import TrainConfig
from .setup import start_run
from .memory import check_training_fits
from ..files import format_bytes
from .trainer import RunResult, train_loop
from ..progress import note

DEFAULT_DATA = DATA_DIR / "train_data.jsonl"
DEFAULT_TOKENIZER = DATA_DIR / "tokenizer"


def train(*, params: str | None = None, config: str | Path | None = None, data: str | Path | None = None,
          out: str | Path | None = None, tokenizer: str | Path | None = None, init: str | Path | None = None,
          resume: bool = False, force: bool = False,
          progress: bool = True, stop_after: int | None = None, dtype: str | None = None,
          **options) -> RunResult:
    """Train a model from scratch, or from the weights of `init` (a model directory); `options` are
    `TrainConfig` fields. With `resume`, continue the run in `out` from its latest checkpoint; `out` must
    otherwise be empty or absent, unless `force`."""
    from ..tokenizer import check_vocab
    data, tokenizer = data or DEFAULT_DATA, tokenizer or DEFAULT_TOKENIZER
    cfg = TrainConfig(**options)
    if cfg.mtp_distill and not init:
        raise ValueError("MTP distillation trains the MTP module of an existing model: give it as `init`")
    model_config = load_config(init) if init else resolve_config(params, config)
    refuse(model_config, f"{init}: training")  # (before the run directory or the data are touched)
    if cfg.mtp_distill and model_config.extra.get("quantization"):
        raise ValueError(f"{init}: a quantized model; MTP distillation trains float weights (give the float model)")
    name = params or (Path(config).stem if config else DEFAULT_PRESET)
    out = Path(out) if out else Path("runs") / (f"{Path(init).name}-mtp" if cfg.mtp_distill else name)
    run = start_run(out, tokenizer=tokenizer, inputs=[init, data, config], resume=resume, force=force)
    tok = run.tokenizer
    if not (init or config) and tok.vocab_size != model_config.vocab_size:
        # A preset gives the architecture; the vocabulary is the tokenizer's (a --config file keeps its own).
        note(f"vocab_size {tok.vocab_size} from the tokenizer {tokenizer} (the preset's is "
             f"{model_config.vocab_size}; give `config` to keep another)")
        model_config = model_config.replace(vocab_size=tok.vocab_size)
    check_vocab(tok, model_config.vocab_size)
    guarded = model_config  # with --mtp-distill: the model with the MTP module it trains (added if absent)
    if cfg.mtp_distill and not model_config.num_nextn_predict_layers:
        guarded = model_config.replace(num_nextn_predict_layers=1)
    check_training_fits(guarded, cfg, f"{init or name}", dtype_size=compute_dtype(dtype).size,
                        trainable=count_params(guarded).mtp if cfg.mtp_distill else None)
    domains = model_config.domain_routing.names if model_config.domain_routing else None
    dataset = run.open_data(data, cfg, domains)
    model = load_model(init, dtype=dtype) if init else random_model(model_config, seed=cfg.seed, dtype=dtype)
    if cfg.mtp_distill:  # only the MTP modules learn; their output heads stay the main model's
        model = with_mtp_module(model, seed=cfg.seed)
        model.freeze()
        for layer in model.model.mtp_layers:
            layer.unfreeze()
            layer.shared_head.freeze()
    model.freeze(keys=["e_score_correction_bias"], strict=False)  # moved by ALF, never by the optimizer

    def export(d: Path) -> None:
        save_model(model, d)
        copy_tokenizer(Path(tokenizer), d)
        write_atomic(d / "train_config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")

    return train_loop(model, dataset, cfg, out, export=export, resume=resume, force=force, progress=progress,
                      stop_after=stop_after, w=run.w)


def describe(result: RunResult) -> str:
    """The end-of-run summary line."""
    val = f", validation loss {result.val.loss:.3f}" if result.val else ""
    return (f"{'interrupted at' if result.interrupted else 'finished'} step {result.step}: train loss "
            f"{result.train_loss:.3f}{val}, {result.tokens_per_s:.0f} tokens/s, peak memory "
            f"{result.peak_memory_gb:.2f} GB; {result.run_dir} holds {format_bytes(result.run_bytes)}"
            + communication(result.history))


def communication(history: list[dict]) -> str:
    """', N ranks: B communicated per step in S' for a data-parallel run (the median step), else ''."""
    steps = [r for r in history if "comm_bytes" in r]
    if not steps:
        return ""
    mid = sorted(steps, key=lambda r: r["comm_s"])[len(steps) // 2]
    return (f"; {mid['ranks']} ranks: {format_bytes(mid['comm_bytes'])} all-summed per step in "
            f"{mid['comm_s'] * 1e3:.0f} ms")
