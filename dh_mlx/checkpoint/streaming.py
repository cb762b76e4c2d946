"""Quantize a checkpoint one decoder layer at a time, for checkpoints larger than memory.

The shards are opened lazily (`mx.load` reads a tensor's bytes only when it is evaluated), every name and shape
is checked against the config before anything is read, and then each layer's tensors are read, dequantized
from FP8 where they are, quantized by the recipe's plan and evaluated one tensor at a time. What is held is
one layer's output and one float32 matrix; what a layer yields is in the file layout (one tensor per expert).
The plan is `quant_predicate` applied to the modules of an unevaluated `Model`, so the choice of what is
quantized, and with which bits, is exactly `quantize_model`'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..device import DTYPES
from ..model import Model
from ..quant import KEYS, QuantConfig, kept_float, quant_block, quant_predicate
from .layout import (CheckpointError, check_tensors, config_for_tensors, dequantize_fp8, dequantized_config,
                     drop_rotary_buffers, fp8_blocks, keep_fp32, release_names, shard_headers,
                     split_fused_experts, stored_dtype, to_memory_layout, unstack_experts)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.")
_MTP_EMBED = re.compile(r"^model\.layers\.\d+\.embed_tokens$")


def lazy_tensors(path: Path, keep: Callable[[str], bool] | None = None, config: ModelConfig | None = None
                 ) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(the directory's tensors that `keep` accepts, unread: `mx.load` reads one only when it is evaluated;
    every tensor's dtype as stored), each shard's header checked before MLX opens it. With `config`, a
    multimodal release's names become ours and its vision tensors are left out (`release_names`)."""
    lazy: dict[str, mx.array] = {}
    dtypes: dict[str, str] = {}
    rename = (None if config is None else release_names(config, path)) or (lambda k: k)
    for f, header in shard_headers(path):
        dtypes.update({rename(k): v["dtype"] for k, v in header.items()
                       if k != "__metadata__" and rename(k) is not None})
        try:
            loaded = ((rename(k), v) for k, v in mx.load(str(f)).items() if rename(k) is not None)
            lazy.update((k, v) for k, v in loaded if keep is None or keep(k))
        except Exception as e:  # MLX raises RuntimeError/ValueError on truncated or corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return lazy, dtypes


def decode_fp8(a: mx.array) -> mx.array:
    """FP8 e4m3 bytes (as MLX reads F8_E4M3) as float32."""
    return mx.from_fp8(a, dtype=mx.float32)


class QuantizedStream:
    """The checkpoint at `path`, checked, as quantized tensors one layer at a time (`layers()`).

    `dtype` is what the float tensors and the scales are stored as: by default the source's (bfloat16 for FP8).
    `mtp=False` leaves the MTP modules out. `config` is the output's (with the `quantization` block).
    A family with its own architecture and layout (DeepSeek-V4: checkpoint/v4_weights.py) overrides the hooks
    between `_fp8_blocks` and `memory_layout`.
    """

    def __init__(self, path: Path, config: ModelConfig, qc: QuantConfig, *, mtp: bool = True,
                 dtype: mx.Dtype | None = None, embedding_copies: bool = True):
        if config.extra.get("quantization") is not None:
            raise CheckpointError(f"{path}: already quantized (load it as it is, without `bits`; to quantize it "
                                  "again, start from its float checkpoint)")
        self.path, self.qc, self.embedding_copies = path, qc, embedding_copies
        self.lazy, self.dtypes = lazy_tensors(path, config=config)  # nothing is read yet
        self.block = self._fp8_blocks(config)
        other = [k for k, d in self.dtypes.items() if d not in ("F32", "BF16", "F16") and not self._fp8(k)
                 and not self._other_dtype_ok(k, d)]
        if other:
            raise CheckpointError(f"{path}: tensor {other[0]} has dtype {self.dtypes[other[0]]}; expected float32, "
                                  "bfloat16, float16 or FP8 with block scales (a quantized model? quantize its "
                                  "float checkpoint)")
        config = self._source_config(dequantized_config(config))
        if not mtp:
            config = config.replace(num_nextn_predict_layers=0)
        self.dtype = dtype or DTYPES[stored_dtype(path)]
        model = self._model(config)  # never evaluated: its modules give the plan and the expected shapes
        self._check(model, config)
        choose = quant_predicate(config, qc)
        modules = {p: m for p, m in model.named_modules() if "weight" in m}
        self.plan = {p: choose(p, m) for p, m in modules.items()}
        self.kept_float = self._kept_float(model, modules)
        block = quant_block(self.plan, qc.bits)
        self.config = type(config).from_dict({**{k: v for k, v in config.to_dict().items() if k not in KEYS},
                                              **{k: block for k in KEYS}})
        self.stored_bits = self.params = 0  # for bits_per_weight, over the tensors in memory layout

    # ---- the hooks a family with its own layout overrides ------------------------------------------------------
    def _fp8_blocks(self, config: ModelConfig) -> tuple[int, int] | None:
        return fp8_blocks(config, self.path)

    def _other_dtype_ok(self, name: str, dtype: str) -> bool:
        """Whether a tensor neither float nor FP8 is one the format has (DeepSeek-V3's has none)."""
        return False

    def _source_config(self, config: ModelConfig) -> ModelConfig:
        return config_for_tensors(config, self.lazy, self.path)

    def _model(self, config: ModelConfig) -> Model:
        return Model(config)

    def _kept_float(self, model: Model, modules: dict) -> list[str]:
        return kept_float(self.plan, {p: m.weight.shape for p, m in modules.items()})

    def memory_layout(self, w: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
        """File layout -> the model's (experts stacked)."""
        return to_memory_layout(w, config, mx.stack)

    def _file_layout(self, w: dict[str, mx.array]) -> dict[str, mx.array]:
        """A layer's tensors as read (FP8 dequantized) -> the file layout written (one tensor per expert)."""
        return unstack_experts(split_fused_experts(drop_rotary_buffers(w, self.config), self.config), self.config)

    def _keep_fp32(self, name: str) -> bool:
        return keep_fp32(name)

    def _fp8(self, k: str) -> bool:
        return self.block is not None and self.dtypes.get(k) == "F8_E4M3"

    def _float(self, w: dict[str, mx.array]) -> dict[str, mx.array]:
        """FP8 block-scaled weights as float32 (lazily); every other tensor as it is."""
        if self.block is None:
            return w
        return dequantize_fp8(w, self.dtypes, self.block, decode_fp8, mx, self.path)

    def _check(self, model: Model, config: ModelConfig) -> None:
        """Names and shapes, from the headers (a lazy graph), before any tensor is read."""
        w = self._float(dict(self.lazy))
        raw = [k for k, v in w.items() if v.dtype == mx.uint8]  # FP8 bytes that no weight_scale_inv scaled
        if raw:
            raise CheckpointError(f"{self.path}: tensor {raw[0]} has dtype F8_E4M3 without a weight_scale_inv")
        w = self.memory_layout(w, config)
        check_tensors({k: v.shape for k, v in w.items()},
                      {k: v.shape for k, v in tree_flatten(model.parameters())}, self.path)

    def _groups(self) -> list[list[str]]:
        """Tensor names by decoder layer, the layers outside them (embedding, norm, head) first."""
        last = self.config.num_hidden_layers + self.config.num_nextn_predict_layers
        groups: dict[int, list[str]] = {}
        for k in self.lazy:
            m = _LAYER.match(k)
            i = int(m[1]) if m else -1
            copy = not self.embedding_copies and _MTP_EMBED.match(k.rsplit(".", 1)[0])  # in memory: the main one
            if i < last and not copy:
                groups.setdefault(i, []).append(k)
        return [groups[i] for i in sorted(groups)]

    def _module(self, name: str) -> str:
        """The module path of a file-layout weight (experts stacked, MTP embedding copies the embedding)."""
        owner = _EXPERT.sub(r"\1.", name.rsplit(".", 1)[0])
        return "model.embed_tokens" if _MTP_EMBED.match(owner) else owner

    def _store(self, name: str, v: mx.array, out: dict[str, mx.array]) -> None:
        owner, leaf = name.rsplit(".", 1)
        choice = self.plan.get(self._module(name), False) if leaf == "weight" else False
        if not mx.issubdtype(v.dtype, mx.floating):  # a table of ids (V4's hash routing), kept as it is
            v = v.astype(mx.int32)
            mx.eval(v)
            out[name] = v
            return
        v = v.astype(mx.float32)
        if not mx.isfinite(v).all().item():
            raise CheckpointError(f"{self.path}: tensor {name} holds NaN or infinite values")
        counted = not _MTP_EMBED.match(owner)  # a copy of the embedding, not a parameter of its own
        if choice:
            q, scales, biases = mx.quantize(v, group_size=choice["group_size"], bits=choice["bits"])
            parts = {name: q, f"{owner}.scales": scales.astype(self.dtype), f"{owner}.biases": biases.astype(self.dtype)}
        else:
            parts = {name: v.astype(mx.float32 if self._keep_fp32(name) else self.dtype)}
        self.params += v.size * counted
        mx.eval(list(parts.values()))
        self.stored_bits += sum(a.nbytes * 8 for a in parts.values()) * counted
        out.update(parts)

    def layers(self) -> Iterator[dict[str, mx.array]]:
        """Each group's quantized tensors, evaluated, in the file layout; the source tensors are let go."""
        for names in self._groups():
            w = {k: self.lazy.pop(k) for k in names}
            w = self._file_layout(self._float(w))
            out: dict[str, mx.array] = {}
            for k in list(w):
                self._store(k, w.pop(k), out)
            yield out
            mx.clear_cache()

    def bits_per_weight(self) -> float:
        """Stored bits per parameter of the float model (as `quant.bits_per_weight`), once `layers()` has run."""
        return self.stored_bits / max(self.params, 1)


def quantized_weights(path: Path, config: ModelConfig, qc: QuantConfig, dtype: mx.Dtype,
                      stream_type: type[QuantizedStream] = QuantizedStream) -> tuple[ModelConfig, dict[str, mx.array]]:
    """(config, weights in memory layout) of the float checkpoint at `path` quantized as it is read, one
    layer at a time: what load_model(bits=...) builds its model from."""
    stream = stream_type(path, config, qc, dtype=dtype, embedding_copies=False)
    weights: dict[str, mx.array] = {}
    for tensors in stream.layers():
        layer = stream.memory_layout(tensors, stream.config)
        tensors.clear()  # the generator holds this dict too: once stacked, only the stacks keep the experts
        mx.eval(list(layer.values()))
        weights.update(layer)
    return stream.config, weights
