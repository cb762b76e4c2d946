"""Quantization: the directory loads in ours and mlx-lm with the same logits, 8-bit is close to float, the
gather_qmm expert path equals the dequantized float path, and the recipe keeps what it must in float."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors import safe_open

from dh_mlx import load_model, save_model
from dh_mlx.model.moe import QuantizedStackedLinear
from dh_mlx.convert.mlx import quantize
from dh_mlx.quant import QuantConfig, QuantizedLinear, dequantize_model, quantize_model
from helpers import force_expert_path, make_checkpoint, tokens

TOL = 1e-4
# Widths that are multiples of 32, so most matrices quantize; q_b_proj's input (48) stays float.
WIDE = dict(hidden_size=64, moe_intermediate_size=64, intermediate_size=128, kv_lora_rank=64)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("float")
    make_checkpoint(d, **WIDE)
    return d


def kl(p_logits: mx.array, q_logits: mx.array) -> float:
    """Mean over positions of KL(p || q) of the next-token distributions."""
    lp, lq = nn.log_softmax(p_logits, axis=-1), nn.log_softmax(q_logits, axis=-1)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()


@pytest.mark.parametrize("bits,recipe", [(4, "uniform"), (8, "mixed"), (4, "mixed")])
def test_quantized_dir_loads_in_ours_and_mlx_lm_with_the_same_logits(float_dir, tmp_path, bits, recipe):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    out = tmp_path / "q"
    summary = quantize(float_dir, out, bits=bits, group_size=32, recipe=recipe, mtp=False)
    assert summary["bytes"] < summary["source_bytes"]
    ours = load_model(out)
    theirs, _ = mlx_lm_utils.load_model(out)
    ids = mx.array(tokens(n=24))  # 48 rows: our CPU path through a transient float weight
    a, b = ours(ids), theirs(ids)
    assert mx.abs(a - b).max().item() <= TOL
    assert isinstance(ours.model.layers[1].mlp.experts.gate_proj, QuantizedStackedLinear)
    assert isinstance(theirs.model.layers[1].mlp.switch_mlp.gate_proj.bits, int)


def test_layout_and_recipe(float_dir, tmp_path):
    quantize(float_dir, tmp_path / "q", bits=4, group_size=32, recipe="mixed")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    q = cfg["quantization"]
    assert cfg["quantization_config"] == q and (q["bits"], q["group_size"], q["mode"]) == (4, 32, "affine")
    assert q["lm_head"]["bits"] == 8 and q["model.layers.0.self_attn.o_proj"]["bits"] == 8
    assert "model.layers.1.self_attn.o_proj" not in q  # middle layers: the default bits
    with safe_open(tmp_path / "q" / "model.safetensors", "np") as f:
        keys = set(f.keys())
        for leaf in ("weight", "scales", "biases"):  # HF per-expert naming, as mlx-lm reads it
            assert f"model.layers.1.mlp.experts.3.gate_proj.{leaf}" in keys
        assert f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight").dtype == np.uint32
        # kept in float: kv_b_proj, the router, its bias, norms, and a width not divisible by the group size
        for name in ("self_attn.kv_b_proj", "mlp.gate", "self_attn.q_b_proj"):
            assert f"model.layers.1.{name}.weight" in keys and f"model.layers.1.{name}.scales" not in keys
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == np.float32
        assert "model.layers.3.embed_tokens.scales" in keys  # the MTP module's copy of the embedding
    m = load_model(tmp_path / "q")  # with MTP
    assert m.config.num_nextn_predict_layers == 1
    save_model(m, tmp_path / "again")  # a quantized model saves and reloads unchanged
    ids = mx.array(tokens())
    assert mx.array_equal(load_model(tmp_path / "again")(ids), m(ids)).item()


def test_eight_bit_is_close_to_float_and_four_bit_further(float_dir, tmp_path):
    ids = mx.array(tokens(n=24))
    ref = load_model(float_dir)(ids)
    kls = {}
    for bits in (8, 4):
        quantize(float_dir, tmp_path / f"q{bits}", bits=bits, group_size=32)
        kls[bits] = kl(ref, load_model(tmp_path / f"q{bits}")(ids))
    assert kls[8] < 1e-4 and kls[8] < kls[4]


@pytest.mark.parametrize("blocked", [False, True])
def test_gather_qmm_path_equals_the_dequantized_float_path(float_dir, blocked, monkeypatch):
    q = load_model(float_dir)
    quantize_model(q, QuantConfig(bits=4, group_size=32))
    ids = mx.array(tokens(n=48, batch=4))  # enough rows for the sorted gather and for CPU blocks
    force_expert_path(monkeypatch, "blocked" if blocked else "gather")
    a = q(ids)
    b = dequantize_model(q)(ids)
    assert not any(isinstance(m, QuantizedStackedLinear) for _, m in q.named_modules())
    assert mx.abs(a - b).max().item() <= TOL


def test_cpu_many_row_path_equals_quantized_matmul_in_values_and_gradients():
    q = nn.QuantizedLinear.from_linear(nn.Linear(64, 96, bias=True), 32, 4)
    q.bias = mx.random.normal((96,))
    q.__class__ = QuantizedLinear  # what loading a quantized directory gives
    x = mx.random.normal((2, 40, 64))  # 80 rows: dequantize + BLAS
    ref = lambda x: nn.QuantizedLinear.__call__(q, x)  # MLX's quantized_matmul
    for f in (lambda m: m(x), lambda m: mx.grad(lambda x: (m(x) ** 2).sum())(x)):
        a, b = f(ref), f(q)
        assert mx.abs(a - b).max().item() <= 1e-5 * mx.abs(a).max().item()


def test_options_are_validated(float_dir, tmp_path):
    with pytest.raises(ValueError, match="'bits'"):
        QuantConfig(bits=7)
    with pytest.raises(ValueError, match="'recipe'"):
        QuantConfig(recipe="fancy")
    quantize(float_dir, tmp_path / "q", bits=8, group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(tmp_path / "q", tmp_path / "qq")
