"""No silently wrong model or sample: config fields strictly typed and bounded, weights of the wrong dtype or
non-finite refused by name, every sampling option checked against its range; each a one-line CLI error."""

import json
import math
import shutil
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dh_mlx import ModelConfig
from dh_mlx.config import load_config
from helpers import corpus_lines, model_with_tokenizer


def run_main(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    from dh_mlx.cli import main
    monkeypatch.setattr(sys, "argv", ["dh-mlx", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(monkeypatch, capsys, *argv) -> str:
    code, _, err = run_main(monkeypatch, capsys, *argv)
    assert code == 1 and "Traceback" not in err, err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_with_tokenizer(tmp_path_factory.mktemp("strict"))


def write_config(tmp_path, **changes):
    d = {**ModelConfig().to_dict(), **changes}
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


@pytest.mark.parametrize("changes, needle", [
    (dict(tie_word_embeddings="no"), "'tie_word_embeddings' must be true or false, got 'no'"),
    (dict(num_hidden_layers=True), "'num_hidden_layers' must be an integer >= 1, got True"),
    (dict(q_lora_rank=True), "'q_lora_rank' must be null or an integer >= 1, got True"),
    (dict(rms_norm_eps=True), "'rms_norm_eps' must be a positive number, got True"),
    (dict(model_type="llama"), "'model_type' must be one of deepseek_v3, deepseek_v2, kimi_k2, kimi_k25, glm4_moe_lite, "
                                  "deepseek_v32, glm_moe_dsa, deepseek_v4, got 'llama'"),
    (dict(num_hidden_layers=10**9), "'num_hidden_layers' must be at most 1024, got 1000000000"),
    (dict(vocab_size=10**12), "'vocab_size' must be at most 16777216"),
    (dict(domain_routing=[1, 2]), "'domain_routing' must be an object or null, got [1, 2]"),
    (dict(quantization=5), "'quantization' must be an object, got 5"),
    (dict(eos_token_id=[1, "2"]), "'eos_token_id' must be null, an integer >= 0 or a list of them"),
])
def test_config_fields_are_strict(tmp_path, monkeypatch, capsys, changes, needle):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match="config.json: config field " + needle.split(" must")[0]):
        load_config(path)
    t0 = time.perf_counter()
    line = error_line(monkeypatch, capsys, "info", "--model", str(path))
    assert needle in line and str(path / "config.json") in line
    assert time.perf_counter() - t0 < 5  # no loop over a hostile size


def test_a_config_file_must_state_its_shapes(tmp_path):
    d = ModelConfig().to_dict()
    del d["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="config field 'hidden_size' is missing"):
        load_config(tmp_path)


def test_weights_of_another_dtype_or_not_finite_are_refused_by_name(model_dir, tmp_path, monkeypatch, capsys):
    for case in ("int", "nan", "inf"):
        bad = tmp_path / case
        shutil.copytree(model_dir, bad)
        w = load_file(bad / "model.safetensors")
        name = "model.layers.1.mlp.experts.3.up_proj.weight"
        if case == "int":
            w[name] = w[name].astype(np.int32)
        else:
            w[name] = w[name].copy()
            w[name][0, 0] = math.nan if case == "nan" else math.inf
        save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
        line = error_line(monkeypatch, capsys, "generate", "--model", str(bad), "--prompt", "x")
        want = "has dtype int32; the model computes in floating point" if case == "int" else \
            "holds NaN or infinite values"
        assert f"tensor {name} {want}" in line, line


@pytest.mark.parametrize("option, value, needle", [
    ("--temp", "nan", "--temp must be a number >= 0"), ("--temp", "-1", "--temp must be"),
    ("--repetition-penalty", "0", "--repetition-penalty must be a number > 0"),
    ("--repetition-penalty", "nan", "--repetition-penalty must be"),
    ("--repetition-penalty", "-1", "--repetition-penalty must be"), ("--min-p", "2", "--min-p must be in [0, 1]"),
    ("--top-p", "0", "--top-p must be in (0, 1]"), ("--max-tokens", "-3", "--max-tokens must be an integer >= 0"),
    ("--prefill-step-size", "0", "--prefill-step-size must be an integer >= 1"),
    ("--top-k", "-2", "--top-k must be an integer >= 0"),
])
def test_sampling_options_are_checked(model_dir, monkeypatch, capsys, option, value, needle):
    line = error_line(monkeypatch, capsys, "generate", "--model", str(model_dir), "--prompt", "x", option, value)
    assert needle in line, line


@pytest.mark.parametrize("mtp", ["--mtp", "--no-mtp"])
def test_max_tokens_zero_generates_nothing(model_dir, monkeypatch, capsys, mtp):
    code, out, err = run_main(monkeypatch, capsys, "generate", "--model", str(model_dir), "--prompt", "the model",
                              "--max-tokens", "0", mtp)
    assert code == 0, err
    from dh_mlx.tokenizer import load_tokenizer
    n = len(load_tokenizer(model_dir).encode("the model", bos=True))
    assert out == "\n" and f"prompt: {n} tokens" in err and "generation: 0 tokens" in err


def test_a_one_document_corpus_warns_instead_of_a_nan_validation_loss(model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": " ".join(corpus_lines(40))}) + "\n")
    code, _, err = run_main(monkeypatch, capsys, "train", "--config", str(model_dir / "config.json"), "--tokenizer",
                            str(model_dir), "--data", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "run"),
                            "--steps", "2", "--batch-size", "2", "--seq-len", "16")
    assert code == 0, err
    assert "no validation split" in err and "nan" not in err.lower(), err
    code, _, err = run_main(monkeypatch, capsys, "lora", "--model", str(model_dir), "--data", str(tmp_path / "one.jsonl"),
                            "--out", str(tmp_path / "lora"), "--steps", "2", "--batch-size", "2", "--seq-len", "16")
    assert code == 0, err
    assert "no validation split" in err and "nan" not in err.lower(), err
