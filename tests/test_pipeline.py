"""Pipeline-parallel generation over mx.distributed, two ranks on loopback: the tokens of one process, each
rank reading and holding only its own layers (about half the weights)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from mlx.utils import tree_flatten

from dh_mlx import load_model
from dh_mlx.checkpoint.weights import Absent
from dh_mlx.generation.pipeline import split_layers
from helpers import free_port, LAUNCH, make_checkpoint, model_with_tokenizer


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tok = model_with_tokenizer(root)
    make_checkpoint(root / "m4", vocab_size=400, num_hidden_layers=4, first_k_dense_replace=1)
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, root / "m4" / f.name)
    return root / "m4"


def test_split_layers():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(61, 4) == [range(0, 16), range(16, 31), range(31, 46), range(46, 61)]
    with pytest.raises(ValueError, match="at least as many decoder layers"):
        split_layers(3, 4)


def test_a_rank_reads_only_its_layers(four_layers):
    first = dict(tree_flatten(load_model(four_layers, layers=range(0, 2)).parameters()))
    last = dict(tree_flatten(load_model(four_layers, layers=range(2, 4)).parameters()))
    layer = lambda k: int(k.split(".")[2]) if k.startswith("model.layers.") else None  # noqa: E731
    assert {layer(k) for k in first} == {0, 1, None} and "model.embed_tokens.weight" in first
    assert "lm_head.weight" not in first and "model.norm.weight" not in first
    assert {layer(k) for k in last} == {2, 3, None} and {"lm_head.weight", "model.norm.weight"} <= set(last)
    assert "model.embed_tokens.weight" not in last  # (its head is not tied to it)
    whole = dict(tree_flatten(load_model(four_layers).parameters()))
    assert all(k in whole and (whole[k] == v).all().item() for part in (first, last) for k, v in part.items())
    assert isinstance(load_model(four_layers, layers=range(2, 4)).model.layers[0], Absent)


def generate(model, *args, ranks=1):
    cmd = [sys.executable, "-m", "dh_mlx.cli", "generate", "--model", str(model), "--prompt", "code math general",
           "--max-tokens", "24", *args]
    if ranks > 1:
        cmd = [str(LAUNCH), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1", "--starting-port",
               str(free_port()), "--", *cmd, "--pipeline"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "error" not in r.stderr and "generation: " in r.stderr, r.stderr
    return r


@pytest.mark.slow
@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this python")
@pytest.mark.parametrize("sampling", [[], ["--temp", "1.0", "--seed", "3"]])
def test_two_ranks_generate_the_tokens_of_one_process(four_layers, sampling):
    one = generate(four_layers, "--no-mtp", *sampling)
    two = generate(four_layers, *sampling, ranks=2)
    assert two.stdout == one.stdout and len(one.stdout.strip()) > 0
    held = {int(r): int(b) for r, b in re.findall(r"pipeline rank (\d) of 2: .*\((\d+) bytes\)", two.stderr)}
    whole = load_model(four_layers)
    main = sum(v.nbytes for k, v in tree_flatten(whole.parameters())
               if not k.startswith(f"model.layers.{whole.config.num_hidden_layers}."))  # without the MTP module
    assert set(held) == {0, 1} and sum(held.values()) == main
    assert all(0.3 * main < b < 0.7 * main for b in held.values())  # each rank about half
