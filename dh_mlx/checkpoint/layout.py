"""The checkpoint layout shared by the MLX model and the PyTorch twin (no framework imported here).

On disk: the HF DeepSeek-V3 names, one tensor per expert, MTP layers at `model.layers.{n + i}` with a copy of
the embedding. In memory: experts stacked `[E, out, in]`, the MTP layers using the main embedding. Each
transform is one function of (tensors, config); the stacking function of the framework is passed in.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable

from .. import families
from ..config import ModelConfig
from ..files import FileKindError, copy_file, read_json, regular_file, same_file

# A quantized expert has `scales` and `biases` beside its packed `weight` (mlx-lm's per-expert layout).
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_LEAVES = ("weight", "scales", "biases")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what was expected."""


# ---- file layout -> modules ------------------------------------------------------------------------------
def release_names(config: ModelConfig, where: Path) -> Callable[[str], str | None] | None:
    """A multimodal release's file names -> ours: its language model's tensors (under `language_model.`) with
    the prefix dropped (and `blocks` read as `layers`, as transformers reads what it writes), None for the vision
    tower and projector, which are not supported (one warning says how many were left out). None: names as
    they are."""
    if config.model_type == "deepseek_v4":
        from .v4_layout import v4_names
        return v4_names(where, config.num_hidden_layers, config.num_nextn_predict_layers)
    prefix = families.TEXT_PREFIX.get(config.model_type)
    if prefix is None:
        return None
    left_out = []

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            if not left_out:
                warnings.warn(f"{where}: the {config.model_type} vision tower and projector are not supported; "
                              "loading its language model (text only)")
            left_out.append(name)
            return None
        name = name[len(prefix):]
        return "model.layers." + name[len("model.blocks."):] if name.startswith("model.blocks.") else name
    return rename


def drop_rotary_buffers(w: dict, config: ModelConfig) -> dict:
    return {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}


def drop_mtp_embedding_copies(w: dict, config: ModelConfig) -> dict:
    """MTP layers carry a copy of the shared embedding on disk; in memory they use the main one."""
    n = config.num_hidden_layers
    return {k: v for k, v in w.items()
            if not re.fullmatch(r"model\.layers\.(\d+)\.embed_tokens\.(weight|scales|biases)", k)
            or int(k.split(".")[2]) < n}


def config_for_tensors(config: ModelConfig, w: dict, where: Path) -> ModelConfig:
    """`config` without MTP layers (and a warning) when it declares some that the checkpoint `w` lacks, e.g.
    one saved by transformers, which keeps num_nextn_predict_layers but drops the MTP tensors."""
    n = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in w):
        warnings.warn(f"{where}: config.json declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                      "checkpoint has none; loading without MTP")
        return config.replace(num_nextn_predict_layers=0)
    return config


def drop_mtp_layers(w: dict, config: ModelConfig) -> dict:
    """Layers past the configured MTP count (a config with MTP off loading a checkpoint with it)."""
    last = config.num_hidden_layers + config.num_nextn_predict_layers
    return {k: v for k, v in w.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < last}


def split_fused_experts(w: dict, config: ModelConfig) -> dict:
    """transformers >= 5 in-memory layout (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I])."""
    out = {}
    for k, v in w.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            half = v.shape[1] // 2
            out[k.replace("gate_up_proj", "gate_proj.weight")] = v[:, :half]
            out[k.replace("gate_up_proj", "up_proj.weight")] = v[:, half:]
        elif k.endswith(".mlp.experts.down_proj"):
            out[k + ".weight"] = v
        else:
            out[k] = v
    return out


def stack_experts(w: dict, config: ModelConfig, stack: Callable[[list], Any]) -> dict:
    """`...experts.{e}.{proj}.{leaf}` x E -> `...experts.{proj}.{leaf}` `[E, ...]`."""
    groups: dict[str, dict[int, Any]] = {}
    out = {}
    for k, v in w.items():
        m = _EXPERT.match(k)
        if m:
            groups.setdefault(f"{m[1]}.{m[3]}.{m[4]}", {})[int(m[2])] = v
        else:
            out[k] = v
    E = config.n_routed_experts
    for name, per_expert in groups.items():
        missing = sorted(set(range(E)) - set(per_expert))
        if missing or len(per_expert) != E:
            raise CheckpointError(f"{name.rsplit('.', 2)[0]}: expected experts 0..{E - 1}, missing {missing[:8]}"
                                  f"{'...' if len(missing) > 8 else ''}")
        out[name] = stack([per_expert[e] for e in range(E)])
    return out


def to_memory_layout(w: dict, config: ModelConfig, stack: Callable[[list], Any]) -> dict:
    for transform in (drop_rotary_buffers, drop_mtp_embedding_copies, drop_mtp_layers, split_fused_experts):
        w = transform(w, config)
    return stack_experts(w, config, stack)


# ---- modules -> file layout --------------------------------------------------------------------------------
def unstack_experts(w: dict, config: ModelConfig) -> dict:
    out = {}
    for k, v in w.items():
        m = _STACKED.match(k)
        if m:
            for e in range(v.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.{m[3]}"] = v[e]
        else:
            out[k] = v
    return out


def add_mtp_embedding_copies(w: dict, config: ModelConfig) -> dict:
    """vLLM's DeepSeek MTP loader reads the embedding from `model.layers.{n+i}.embed_tokens`."""
    out = dict(w)
    for i in range(config.num_nextn_predict_layers):
        for leaf in _LEAVES:  # scales/biases when the embedding is quantized
            if f"model.embed_tokens.{leaf}" in w:
                out[f"model.layers.{config.num_hidden_layers + i}.embed_tokens.{leaf}"] = w[f"model.embed_tokens.{leaf}"]
    return out


def to_file_layout(w: dict, config: ModelConfig) -> dict:
    return add_mtp_embedding_copies(unstack_experts(w, config), config)


# ---- files and checks --------------------------------------------------------------------------------------
#: What a model directory's weights are written as (and all --force may remove of an earlier write there).
WEIGHT_FILES = r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|\.tmp-shard-\d{5}\.safetensors"


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = read_json(index, "index")["weight_map"]
            names = sorted(set(weight_map.values()))
        except FileKindError as e:
            raise CheckpointError(str(e)) from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if outside:
            raise CheckpointError(f"{index}: weight_map names {outside[0]!r}; shards must be files in the model "
                                  "directory itself")
        files = [path / n for n in names]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: lists shards that do not exist: {', '.join(absent)}")
        return _regular(files)
    # Only model weights: a directory may also hold adapters.safetensors or a checkpoint's optimizer state.
    single = path / "model.safetensors"
    files = [single] if single.exists() else sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors (or index) in this directory")
    return _regular(files)


def _regular(files: list[Path]) -> list[Path]:
    """`files` if each is a regular file: a FIFO or device would block or never end."""
    try:
        return [regular_file(f) for f in files]
    except FileKindError as e:
        raise CheckpointError(str(e)) from None


def shard_headers(path: Path) -> list[tuple[Path, dict]]:
    """Each weight file of the model directory `path` with its checked header. A tensor in two files, or in a
    file other than the one the index names for it, is refused by name (a reader would take one silently)."""
    files = safetensors_files(path)  # (checks the index)
    index = path / "model.safetensors.index.json"
    weight_map = read_json(index, "index")["weight_map"] if index.exists() else None
    seen: dict[str, Path] = {}
    out = []
    for f in files:
        header = read_safetensors_header(f)
        for name in header:
            if name == "__metadata__":
                continue
            if name in seen:
                raise CheckpointError(f"{path}: tensor {name} is in both {seen[name].name} and {f.name}")
            if weight_map is not None and weight_map.get(name) != f.name:
                raise CheckpointError(f"{index}: names {weight_map.get(name)!r} for tensor {name}, which is in "
                                      f"{f.name}")
            seen[name] = f
        out.append((f, header))
    missing = sorted(set(weight_map or ()) - set(seen))
    if missing:
        raise CheckpointError(f"{index}: names {weight_map[missing[0]]} for tensor {missing[0]}, which it does not "
                              "hold")
    return out


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
             "F8_E8M0": 1}
_MAX_HEADER = 100 << 20


def read_safetensors_header(f: Path) -> dict:
    """The header of a safetensors file, every entry checked against the file (dtype, shape, offsets inside the
    data and of the size the shape implies), so no reader is handed a header that points past the file."""
    _regular([f])
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{f}: not a safetensors file (its header size {n} does not fit its {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{f}: its safetensors header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: its safetensors header is not an object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _ITEMSIZE
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ints = lambda v, k: isinstance(v, list) and len(v) in k and all(  # noqa: E731
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
        if not (ok and ints(shape, range(0, 9)) and ints(offsets, (2,))):
            raise CheckpointError(f"{f}: tensor {name!r}: a header entry needs dtype, shape and data_offsets")
        count = 1
        for d in shape:
            count *= d
        begin, end = offsets
        if not begin <= end <= data or end - begin != count * _ITEMSIZE[info["dtype"]]:
            raise CheckpointError(f"{f}: tensor {name!r}: data_offsets {offsets} do not hold {info['dtype']} "
                                  f"{shape} inside the file's {data} data bytes")
    return header


_NUMPY = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def _e4m3_table():
    """float32 value of each FP8 e4m3fn byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7f/0xff NaN."""
    import numpy as np

    b = np.arange(256)
    exp, mant = (b >> 3) & 15, (b & 7).astype(np.float64)
    value = np.where(exp == 0, mant / 8 * 2.0 ** -6, (1 + mant / 8) * 2.0 ** (exp - 7))
    value = np.where((b & 127) == 127, np.nan, value)
    return np.where(b >= 128, -value, value).astype(np.float32)


def read_float32(path: Path, config: ModelConfig | None = None) -> dict:
    """Every tensor of the model directory `path` as a float32 numpy array (file layout, no framework):
    headers checked first, bfloat16 widened bit-exactly, FP8 block-scaled weights dequantized (with `config`);
    any other non-float tensor (e.g. packed quantized weights) or a NaN/infinite value is refused, naming it."""
    import numpy as np

    block = None if config is None else fp8_blocks(config, path)
    rename = None if config is None else release_names(config, path)
    out, dtypes = {}, {}
    for f, header in shard_headers(path):
        with open(f, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
        data = np.memmap(f, dtype=np.uint8, mode="r", offset=start)
        for name, info in header.items():
            if name == "__metadata__" or (rename is not None and rename(name) is None):
                continue
            name = name if rename is None else rename(name)
            dtypes[name] = info["dtype"]
            fp8 = info["dtype"] == "F8_E4M3" and block is not None
            if info["dtype"] not in _NUMPY and not fp8:
                raise CheckpointError(f"{f}: tensor {name} has dtype {info['dtype']}; expected float32, bfloat16 "
                                      "or float16 (a quantized model? convert its float checkpoint)")
            begin, end = info["data_offsets"]
            a = data[begin:end].view("u1" if fp8 else _NUMPY[info["dtype"]]).reshape(info["shape"])
            if not fp8:
                a = (a.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else a.astype(np.float32)
            out[name] = a
    if block is not None:
        table = _e4m3_table()
        out = dequantize_fp8(out, dtypes, block, lambda a: table[a], np, path)
    for name, a in out.items():
        if a.dtype != np.float32:  # FP8 bytes without their scales
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtypes[name]} without a weight_scale_inv")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model in memory layout (routed experts stacked) and its shape, from the config alone:
    what a checkpoint must hold, checked without building a model."""
    c = config
    D, H, V = c.hidden_size, c.num_attention_heads, c.vocab_size
    r, n, p, v = c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)

    def linear(name: str, rows: int, cols: int, bias: bool = False) -> None:
        out[f"{name}.weight"] = (rows, cols)
        if bias:
            out[f"{name}.bias"] = (rows,)

    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        pre = f"model.layers.{i}"
        a = f"{pre}.self_attn"
        if c.q_lora_rank is None:
            linear(f"{a}.q_proj", H * (n + p), D)
        else:
            linear(f"{a}.q_a_proj", c.q_lora_rank, D, c.attention_bias)
            out[f"{a}.q_a_layernorm.weight"] = (c.q_lora_rank,)
            linear(f"{a}.q_b_proj", H * (n + p), c.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", r + p, D, c.attention_bias)
        out[f"{a}.kv_a_layernorm.weight"] = (r,)
        linear(f"{a}.kv_b_proj", H * (n + v), r)
        linear(f"{a}.o_proj", D, H * v, c.attention_bias)
        if c.has_indexer(i):
            Hi, Di = c.index_n_heads, c.index_head_dim
            linear(f"{a}.indexer.wq_b", Hi * Di, c.q_lora_rank)
            linear(f"{a}.indexer.wk", Di, D)
            out[f"{a}.indexer.k_norm.weight"] = out[f"{a}.indexer.k_norm.bias"] = (Di,)
            linear(f"{a}.indexer.weights_proj", Hi, D)
        out[f"{pre}.input_layernorm.weight"] = out[f"{pre}.post_attention_layernorm.weight"] = (D,)
        if c.is_moe_layer(i):
            E, I = c.n_routed_experts, c.moe_intermediate_size
            out[f"{pre}.mlp.gate.weight"] = (E, D)
            if c.topk_method == "noaux_tc":
                out[f"{pre}.mlp.gate.e_score_correction_bias"] = (E,)
            out[f"{pre}.mlp.experts.gate_proj.weight"] = out[f"{pre}.mlp.experts.up_proj.weight"] = (E, I, D)
            out[f"{pre}.mlp.experts.down_proj.weight"] = (E, D, I)
            if c.n_shared_experts:
                S = I * c.n_shared_experts
                for proj, shape in (("gate_proj", (S, D)), ("up_proj", (S, D)), ("down_proj", (D, S))):
                    out[f"{pre}.mlp.shared_experts.{proj}.weight"] = shape
        else:
            F = c.intermediate_size
            for proj, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
                out[f"{pre}.mlp.{proj}.weight"] = shape
        if i >= c.num_hidden_layers:  # an MTP module
            out[f"{pre}.enorm.weight"] = out[f"{pre}.hnorm.weight"] = out[f"{pre}.shared_head.norm.weight"] = (D,)
            out[f"{pre}.eh_proj.weight"] = (D, 2 * D)
            out[f"{pre}.shared_head.head.weight"] = (V, D)
    return out


def fp8_blocks(config: ModelConfig, where: Path) -> tuple[int, int] | None:
    """The (rows, columns) of one scale block when `quantization_config` says the weights are FP8 with block
    scales (DeepSeek-V3's release format, `quant_method: fp8`), else None."""
    qc = config.extra.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in (None, "fp8"):  # e.g. compressed-tensors INT4 (Kimi-K2 Thinking, Kimi-K2.5)
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} "
                              f"({qc.get('format', 'its own tensor format')}) is not supported; dh-mlx reads float, "
                              "FP8-block and MLX-quantized checkpoints")
    if method != "fp8":
        return None
    block = qc.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers, "
                              f"got {block!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}: FP8 format {qc.get('fmt')!r}; dh-mlx reads e4m3 (DeepSeek-V3's)")
    return block[0], block[1]


def dequantized_config(config: ModelConfig) -> ModelConfig:
    """The config once an FP8 checkpoint's weights are dequantized (without its `quantization_config`); any
    other config as it is."""
    if (config.extra.get("quantization_config") or {}).get("quant_method") != "fp8":
        return config
    return dataclasses.replace(config, extra={k: v for k, v in config.extra.items() if k != "quantization_config"})


def dequantize_fp8(w: dict, dtypes: dict[str, str], block: tuple[int, int], decode: Callable, xp: Any,
                   where: Path, finish: Callable = lambda a: a) -> dict:
    """FP8 e4m3 weights (read as raw bytes) with their `weight_scale_inv` -> float: each block of the decoded
    weight times its scale, edge blocks partial. `decode` turns the bytes into float32, `finish` each result
    into what is kept (e.g. cast to the compute dtype and evaluated: one float32 weight at a time); `xp` is
    numpy or mlx. Entries of `w` are taken out as they are done."""
    out, bo, bi = {}, *block
    for k in list(w):
        if k.endswith(".weight_scale_inv") or k not in w:
            continue
        v = w.pop(k)
        scale = w.pop(k + "_scale_inv", None)
        if scale is None:
            out[k] = v
            continue
        if v.ndim != 2:
            raise CheckpointError(f"{where}: tensor {k} has a weight_scale_inv but {v.ndim} dimensions; FP8 block "
                                  "scales are for matrices")
        if dtypes.get(k) != "F8_E4M3":
            raise CheckpointError(f"{where}: tensor {k} has a weight_scale_inv but dtype {dtypes.get(k)}; "
                                  "expected F8_E4M3")
        rows, cols = v.shape
        if tuple(scale.shape) != (-(-rows // bo), -(-cols // bi)):
            raise CheckpointError(f"{where}: tensor {k}_scale_inv has shape {tuple(scale.shape)}; {rows} x {cols} "
                                  f"in {bo} x {bi} blocks needs {(-(-rows // bo), -(-cols // bi))}")
        s = xp.repeat(xp.repeat(scale.astype(xp.float32), bo, axis=0), bi, axis=1)[:rows, :cols]
        out[k] = finish(decode(v) * s)
    return out


def check_tensors(shapes: dict[str, tuple], expected: dict[str, tuple], where: Path) -> None:
    """Names and shapes read (`shapes`) against what the config implies (`expected`)."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))

    def listing(keys):
        return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
    if missing or unexpected:
        parts = ([f"missing tensors: {listing(missing)}"] if missing else []) + (
            [f"unexpected tensors: {listing(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where}: does not match its config.json: " + "; ".join(parts))
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k]):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(shape)}, config.json implies "
                                  f"{tuple(expected[k])}")


def keep_fp32(name: str) -> bool:
    # The router runs in float32 everywhere (as transformers keeps it); its bias moves in 1e-3 steps. So does
    # the sparse-attention indexer's head weighting (transformers keeps it in float32).
    return (name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")
            or name.endswith("indexer.weights_proj.weight"))


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of model directory `src` (those present) into `dst` (never through a link)."""
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                 "chat_template.jinja", "generation_config.json"):
        if (src / name).exists() and not same_file(src / name, dst / name):
            copy_file(src / name, dst / name)


_STORED_AS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "bfloat16"}


def stored_dtype(model_dir: Path) -> str:
    """The floating dtype most of the checkpoint's bytes are stored in (read from the safetensors headers; FP8
    counts as bfloat16, what it is written back as)."""
    counts: dict[str, int] = {}
    for f in safetensors_files(model_dir):
        for name, info in read_safetensors_header(f).items():
            if name != "__metadata__" and info["dtype"] in _STORED_AS and not name.endswith("_scale_inv"):
                begin, end = info["data_offsets"]
                kind = _STORED_AS[info["dtype"]]
                counts[kind] = counts.get(kind, 0) + end - begin
    return max(counts, key=counts.get) if counts else "float32"
