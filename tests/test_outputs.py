"""No command replaces data it was not asked to replace: an output that is the input, or an existing model or
run directory, is refused unless --force (or --resume); --resume refuses a config of other shapes."""

import hashlib
import json
import shutil

import pytest

from dh_mlx.outputs import OutputError
from helpers import cli, make_config, model_with_tokenizer


def one_line_error(r) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and r.stderr.rstrip().endswith(lines[0]), r.stderr
    return lines[0]


def digest(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != ".lock"}  # the lock holds the pid of the last training


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A model directory with a tokenizer, a small corpus, and that tokenizer alone."""
    root = tmp_path_factory.mktemp("outputs")
    model_with_tokenizer(root, "model")
    return root


@pytest.mark.slow
def test_quantize_onto_its_input_is_refused_and_the_input_kept(inputs):
    before = digest(inputs / "model")
    msg = one_line_error(cli("quantize", "--model", str(inputs / "model"), "--out", str(inputs / "model")))
    assert "is, or holds, the input" in msg
    msg = one_line_error(cli("quantize", "--model", str(inputs / "model"), "--out", str(inputs / "model"), "--force"))
    assert "is, or holds, the input" in msg  # --force never makes an input its own output
    assert digest(inputs / "model") == before


@pytest.mark.slow
def test_writing_into_an_existing_directory_needs_force(inputs, tmp_path):
    model = str(inputs / "model")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for args in (["quantize", "--model", model], ["convert", "hf", "--model", model],
                 ["fuse", "--model", model, "--adapter", str(tmp_path / "none")],
                 ["tokenizer", "train", "--data", str(inputs / "data.jsonl"), "--vocab-size", "400"]):
        assert "already holds notes.txt; pass --force" in one_line_error(cli(*args, "--out", str(taken))), args
    assert (taken / "notes.txt").read_text() == "mine"
    r = cli("quantize", "--model", model, "--out", str(taken), "--force")
    assert r.returncode == 0, r.stderr
    assert (taken / "config.json").is_file()


@pytest.mark.slow
def test_train_does_not_replace_an_existing_model_directory(inputs, tmp_path):
    shutil.copytree(inputs / "model", tmp_path / "model")
    before = digest(tmp_path / "model")
    common = ["--data", str(inputs / "data.jsonl"), "--tokenizer", str(inputs / "tok"), "--steps", "1",
              "--batch-size", "2", "--seq-len", "16", "--config", str(inputs / "model" / "config.json")]
    msg = one_line_error(cli("train", "--out", str(tmp_path / "model"), *common))
    assert "already holds" in msg and "--force" in msg
    assert digest(tmp_path / "model") == before
    msg = one_line_error(cli("train", "--out", str(tmp_path / "model"), "--resume", *common))
    assert "no run to resume" in msg
    r = cli("train", "--out", str(tmp_path / "model"), "--force", *common)
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "model") != before


def test_resume_refuses_a_config_of_other_shapes(inputs, tmp_path):
    common = ["--data", str(inputs / "data.jsonl"), "--tokenizer", str(inputs / "tok"), "--batch-size", "2",
              "--seq-len", "16", "--out", str(tmp_path / "run")]
    r = cli("train", "--config", str(inputs / "model" / "config.json"), "--steps", "1", *common)
    assert r.returncode == 0, r.stderr
    other = make_config(vocab_size=400, moe_intermediate_size=48).to_dict()
    (tmp_path / "other.json").write_text(json.dumps(other))
    before = digest(tmp_path / "run")
    msg = one_line_error(cli("train", "--config", str(tmp_path / "other.json"), "--steps", "2", "--resume", *common))
    # the first differing tensor by name, both shapes
    assert "tensor model.layers.1.mlp.experts.down_proj.weight is (8, 64, 32) in the checkpoint but (8, 64, 48)" \
        in msg, msg
    assert digest(tmp_path / "run") == before


@pytest.mark.slow
def test_gguf_onto_a_directory_is_one_line_and_leaves_no_file(inputs, tmp_path):
    (tmp_path / "dir").mkdir()
    msg = one_line_error(cli("convert", "gguf", "--model", str(inputs / "model"), "--out", str(tmp_path / "dir")))
    assert "is a directory" in msg
    assert list(tmp_path.rglob("*")) == [tmp_path / "dir"]
    before = digest(inputs / "model")
    for own in ("model.safetensors", "config.json"):  # a file of the input, even with --force
        msg = one_line_error(cli("convert", "gguf", "--model", str(inputs / "model"), "--out",
                                 str(inputs / "model" / own), "--force"))
        assert "is the input" in msg and "one of its files" in msg
    assert digest(inputs / "model") == before
    (tmp_path / "m.gguf").write_text("keep")
    assert "exists; pass --force" in one_line_error(
        cli("convert", "gguf", "--model", str(inputs / "model"), "--out", str(tmp_path / "m.gguf")))
    assert (tmp_path / "m.gguf").read_text() == "keep"


def test_the_library_refuses_as_the_cli_does(inputs, tmp_path):
    from dh_mlx.convert import import_checkpoint
    from dh_mlx.convert.mlx import quantize
    with pytest.raises(OutputError, match="is, or holds, the input"):
        quantize(inputs / "model", inputs / "model")
    with pytest.raises(OutputError, match="holds, the input"):  # the output holds the input file
        import_checkpoint(inputs / "model" / "model.safetensors", inputs / "model",
                          config=inputs / "model" / "config.json", force=True)
