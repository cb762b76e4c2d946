"""What a training step holds at its peak, from the config alone: checked before a model is built or a corpus
read, so a run that cannot fit is refused at once with what would fit."""

from __future__ import annotations

from ..config import ModelConfig, load_preset, preset_names
from ..device import available_memory
from ..files import format_bytes
from ..params import count_params
from .config import TrainConfig


def activation_elements(c: ModelConfig, batch: int, seq: int, *, checkpointing: bool = False,
                        mtp: bool = True) -> int:
    """Values kept for the backward pass: the big tensors of each layer (MTP layers too, when trained) + the
    logits, their softmax and its gradient per output head. A rough count (test_memory.py bounds its error)."""
    B, T, D, H = batch, seq, c.hidden_size, c.num_attention_heads
    v4 = c.model_type == "deepseek_v4"  # one key/value head, queries from q_lora_rank; hc_mult residual streams
    attention = B * H * T * T * 2 + (
        B * T * (6 * c.hc_mult * D + 3 * H * c.head_dim + 2 * c.q_lora_rank + 4 * c.head_dim) if v4 else
        B * T * (6 * D + 2 * H * (c.qk_head_dim + c.v_head_dim) + 2 * c.kv_lora_rank))

    def layer(i: int) -> int:
        if not v4 and not c.is_moe_layer(i):
            return attention + 3 * B * T * c.intermediate_size
        k, inter = c.num_experts_per_tok, c.moe_intermediate_size
        return attention + B * T * (2 * k * (3 * inter + 2 * D) + 3 * inter * (c.n_shared_experts or 0)
                                    + 2 * c.n_routed_experts)

    n_mtp = c.num_nextn_predict_layers if mtp else 0
    per_layer = [layer(i) for i in range(c.num_hidden_layers)] + [layer(c.num_hidden_layers - 1)] * n_mtp
    kept = B * T * D * len(per_layer) + max(per_layer) if checkpointing else sum(per_layer)
    return kept + 3 * B * T * c.vocab_size * (1 + n_mtp)


def training_peak_bytes(c: ModelConfig, cfg: TrainConfig, *, dtype_size: int = 4, trainable: int | None = None,
                        weights: int | None = None, checkpointing: bool = False) -> dict[str, int]:
    """Bytes of weights (`weights` when known, e.g. a quantized base's; else every parameter at `dtype_size`),
    gradients + AdamW moments (of `trainable` parameters; default all) and activations. The one estimate of a
    training step's memory: `train` checks it before building a model, `lora` reports it (`info --plan` splits
    the same activations over ranks)."""
    p = count_params(c)
    every = (p.total + p.mtp) * dtype_size
    trainable_bytes = every if trainable is None else trainable * dtype_size
    return {"weights": every if weights is None else weights, "optimizer": 3 * trainable_bytes,
            "activations": dtype_size * activation_elements(c, cfg.batch_size, cfg.seq_len,
                                                            checkpointing=checkpointing, mtp=cfg.mtp_lambda > 0)}


def check_training_fits(c: ModelConfig, cfg: TrainConfig, what: str, *, dtype_size: int = 4,
                        trainable: int | None = None) -> None:
    """MemoryError, before anything is allocated, when the step's peak would not fit in free memory; it says
    what would: a smaller batch (with gradient accumulation to keep the tokens per step), LoRA, a smaller
    preset."""
    have = 0.9 * available_memory()
    parts = training_peak_bytes(c, cfg, dtype_size=dtype_size, trainable=trainable)
    need = sum(parts.values())
    if need <= have:
        return
    options = []

    def fits(b: int) -> bool:
        smaller = TrainConfig(**{**cfg.to_dict(), "batch_size": b})
        return sum(training_peak_bytes(c, smaller, dtype_size=dtype_size, trainable=trainable).values()) <= have

    lo, hi = 0, cfg.batch_size - 1  # the largest batch that fits, by bisection (the need grows with the batch)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    if lo:
        accum = -(-cfg.batch_size * cfg.grad_accum // lo)  # the same tokens per optimizer step, or more
        options.append(f"`batch_size={lo}` `grad_accum={accum}`")
    lora = sum(training_peak_bytes(c, TrainConfig(**{**cfg.to_dict(), "mtp_lambda": 0.0}), dtype_size=dtype_size,
                                   trainable=0, checkpointing=True).values())
    if trainable is None and lora <= have:
        options.append(f"dh-mlx lora on a trained model with `grad_checkpoint=True` (~{format_bytes(lora, 'GiB')})")
    fitting = [n for n in preset_names()
               if sum(training_peak_bytes(load_preset(n), cfg, dtype_size=dtype_size).values()) <= have]
    if fitting:
        options.append(f"a smaller preset: {', '.join(fitting)}")
    raise MemoryError(f"training {what} with batch {cfg.batch_size} x {cfg.seq_len} needs about {format_bytes(need, 'GiB')} "
                      f"(weights {format_bytes(parts['weights'], 'GiB')}, gradients and AdamW state {format_bytes(parts['optimizer'], 'GiB')}, "
                      f"activations {format_bytes(parts['activations'], 'GiB')}), but only {format_bytes(have / 0.9, 'GiB')} is available; "
                      f"would fit: {'; '.join(options) or 'a machine with more memory'}")
