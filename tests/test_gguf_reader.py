"""The GGUF writer reads checkpoints without building a model: the tensors must be the ones the MLX model
loads, for every layout a checkpoint comes in (runs without llama-cpp-python, unlike test_gguf.py)."""

import numpy as np
import pytest
from mlx.utils import tree_flatten

from dh_mlx import CheckpointError, load_model, save_model
from dh_mlx.convert import ConvertError
from dh_mlx.convert.gguf import read_weights
from helpers import CONFIGS, make_checkpoint


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensors_equal_the_loaded_models(tmp_path, name, dtype):
    save_model(make_checkpoint(tmp_path / "f32", name), tmp_path / "m", dtype=dtype)
    want = {k: np.array(v) for k, v in tree_flatten(load_model(tmp_path / "m", dtype="float32").parameters())}
    got, config = read_weights(tmp_path / "m")
    assert config == load_model(tmp_path / "m").config
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_shape_table_is_the_models(name):
    """layout.expected_shapes (framework-free) lists exactly the MLX model's parameters and their shapes."""
    from dh_mlx import random_model
    from dh_mlx.checkpoint.layout import expected_shapes
    from helpers import make_config
    for overrides in ({}, {"tie_word_embeddings": True}):
        config = make_config(name, **overrides)
        model = random_model(config, seed=0)
        assert expected_shapes(config) == {k: v.shape for k, v in tree_flatten(model.parameters())}


def test_missing_tensors_and_quantized_models_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from dh_mlx.convert.mlx import quantize
    make_checkpoint(tmp_path / "m")
    src = tmp_path / "m"
    w = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in w.items() if k != "model.layers.1.self_attn.o_proj.weight"},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.self_attn.o_proj.weight"):
        read_weights(src)
    w["model.layers.1.self_attn.o_proj.weight"] = w["model.layers.1.self_attn.o_proj.weight"].T.copy()
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj.weight has shape"):
        read_weights(src)
    save_file({k: v for k, v in w.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing \\[3\\]"):
        read_weights(src)
    make_checkpoint(tmp_path / "f")
    quantize(tmp_path / "f", tmp_path / "q", bits=8, group_size=32)
    with pytest.raises(ConvertError, match="MLX-quantized model"):
        read_weights(tmp_path / "q")
