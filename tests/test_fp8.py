"""FP8 checkpoints as DeepSeek-V3 releases them: e4m3 weights with a `weight_scale_inv` per block (block size
from `quantization_config`, partial edge blocks), dequantized on load; the reference is the dequantized float
checkpoint, in our model and in transformers."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dh_mlx import CheckpointError, load_model
from dh_mlx.convert.gguf import read_weights as read_for_gguf
from helpers import make_checkpoint, make_fp8, tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(FP8 directory, its dequantized float directory, the original float directory)."""
    root = tmp_path_factory.mktemp("fp8")
    make_checkpoint(root / "float")
    return make_fp8(root / "float", root / "fp8", root / "deq")


def test_fp8_blocks_load_as_the_dequantized_weights(checkpoints):
    fp8, deq, original = checkpoints
    ids = mx.array(tokens())
    ours, ref = load_model(fp8), load_model(deq)
    assert "quantization_config" not in ours.config.extra  # a float model once loaded
    np.testing.assert_array_equal(np.array(ours(ids)), np.array(ref(ids)))
    assert mx.abs(ours(ids) - load_model(original)(ids)).max().item() > 1e-4  # FP8 changed the weights


def test_fp8_logits_equal_transformers_on_the_dequantized_weights(checkpoints):
    transformers = pytest.importorskip("transformers")
    fp8, deq, _ = checkpoints
    ids = tokens()
    hf = transformers.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = np.array(load_model(fp8, dtype="float32")(mx.array(ids)))
    assert np.abs(got - want).max() <= 1e-4


def test_the_gguf_reader_dequantizes_fp8_the_same_way(checkpoints):
    fp8, deq, _ = checkpoints
    got, config = read_for_gguf(fp8)
    want, want_config = read_for_gguf(deq)
    assert config == want_config and got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_the_e4m3_table_is_torchs_for_every_byte():
    from dh_mlx.checkpoint.layout import _e4m3_table
    table, want = _e4m3_table(), torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(table), np.isnan(want)) and np.isnan(table[0x7F]) and np.isnan(table[0xFF])
    assert np.array_equal(table[~np.isnan(table)], want[~np.isnan(want)]) and table[1] == 2.0 ** -9  # subnormal


def test_convert_hf_writes_an_fp8_release_as_bfloat16(checkpoints, tmp_path):
    from dh_mlx.convert import export_hf
    fp8, deq, _ = checkpoints
    export_hf(fp8, tmp_path / "hf")
    header = json.loads((tmp_path / "hf" / "model.safetensors").read_bytes()[8:][:int.from_bytes(
        (tmp_path / "hf" / "model.safetensors").read_bytes()[:8], "little")])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__" and not k.endswith("gate.weight")
              and "norm" not in k and "bias" not in k}
    assert dtypes == {"BF16"}
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_broken_fp8_scales_are_named(checkpoints, tmp_path):
    fp8, _, _ = checkpoints
    tensors = load_file(str(fp8 / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("o_proj.weight_scale_inv"))
    tensors[key] = tensors[key][:-1]
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "m" / "config.json").write_text((fp8 / "config.json").read_text())
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv has shape"):
        load_model(tmp_path / "m")
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [0, 16]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_block_size"):
        load_model(tmp_path / "m")
