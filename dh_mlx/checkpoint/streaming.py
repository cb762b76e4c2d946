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

from ..config_v4 import refuse
from ..config import ModelConfig
from ..device import DTYPES
from ..model import Model
from ..quant import KEYS, QuantConfig, quant_predicate
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
    """

    def __init__(self, path: Path, config: ModelConfig, qc: QuantConfig, *, mtp: bool = True,
                 dtype: mx.Dtype | None = None, embedding_copies: bool = True):
        refuse(config, f"{path}: quantizing")
        if config.extra.get("quantization") is not None:
            raise CheckpointError(f"{path}: already quantized (load it as it is, without `bits`; to quantize it "
                                  "again, start from its float checkpoint)")
        self.path, self.qc, self.embedding_copies = path, qc, embedding_copies
        self.lazy, self.dtypes = lazy_tensors(path, config=config)  # nothing is read yet
        self.block = fp8_blocks(config, path)
        other = [k for k, d in self.dtypes.items() if d not in ("F32", "BF16", "F16") and not self._fp8(k)]
        if other:
            raise CheckpointError(f"{path}: tensor {other[0]} has dtype {self.dtypes[other[0]]}; expected float32, "
                                  "bfloat16, float16 or FP8 with block scales (a quantized model? quantize its "
                                  "float checkpoint)")
        config = config_for_tensors(dequantized_config(config), self.lazy, path)
        if not mtp:
            config = config.replace(num_nextn_predict_layers=0)
        self.dtype = dtype or DTYPES[stored_dtype(path)]
        model = Model(config)  # never evaluated: its modules give the plan and the expected shapes
        self._check(model, config)
        choose = quant_predicate(config, qc)
        self.plan = {p: choose(p, m) for p, m in model.named_modules() if "weight" in m}
        block: dict = {"group_size": qc.group_size, "bits": qc.bits, "mode": "affine"}
        block.update({p: r for p, r in self.plan.items() if isinstance(r, dict)})
        self.config = ModelConfig.from_dict({**{k: v for k, v in config.to_dict().items() if k not in KEYS},
                                             **{k: block for k in KEYS}})
        self.stored_bits = self.params = 0  # for bits_per_weight, over the tensors in memory layout

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
        w = to_memory_layout(w, config, mx.stack)
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
        v = v.astype(mx.float32)
        if not mx.isfinite(v).all().item():
            raise CheckpointError(f"{self.path}: tensor {name} holds NaN or infinite values")
        counted = not _MTP_EMBED.match(owner)  # a copy of the embedding, not a parameter of its own
        if choice:
            p = {"group_size": self.qc.group_size, "bits": self.qc.bits, **(choice if isinstance(choice, dict) else {})}
            q, scales, biases = mx.quantize(v, group_size=p["group_size"], bits=p["bits"])
            parts = {name: q, f"{owner}.scales": scales.astype(self.dtype), f"{owner}.biases": biases.astype(self.dtype)}
        else:
            parts = {name: v.astype(mx.float32 if keep_fp32(name) else self.dtype)}
        self.params += v.size * counted
        mx.eval(list(parts.values()))
        self.stored_bits += sum(a.nbytes * 8 for a in parts.values()) * counted
        out.update(parts)

    def layers(self) -> Iterator[dict[str, mx.array]]:
        """Each group's quantized tensors, evaluated, in the file layout; the source tensors are let go."""
        for names in self._groups():
            w = {k: self.lazy.pop(k) for k in names}
            w = unstack_experts(split_fused_experts(drop_rotary_buffers(self._float(w), self.config), self.config),
                                self.config)
            out: dict[str, mx.array] = {}
            for k in list(w):
                self._store(k, w.pop(k), out)
            yield out
            mx.clear_cache()

    def bits_per_weight(self) -> float:
        """Stored bits per parameter of the float model (as `quant.bits_per_weight`), once `layers()` has run."""
        return self.stored_bits / max(self.params, 1)


def quantized_weights(path: Path, config: ModelConfig, qc: QuantConfig, dtype: mx.Dtype
                      ) -> tuple[ModelConfig, dict[str, mx.array]]:
    """(config, weights in memory layout) of the float checkpoint at `path` quantized as it is read, one
    layer at a time: what load_model(bits=...) builds its model from."""
    stream = QuantizedStream(path, config, qc, dtype=dtype, embedding_copies=False)
    weights: dict[str, mx.array] = {}
    for tensors in stream.layers():
        layer = to_memory_layout(tensors, stream.config, mx.stack)
        tensors.clear()  # the generator holds this dict too: once stacked, only the stacks keep the experts
        mx.eval(list(layer.values()))
        weights.update(layer)
    return stream.config, weights
