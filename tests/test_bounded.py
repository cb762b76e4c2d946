"""Bounded work on any input and one-line errors: JSONL records nested 100,000 deep or holding lone surrogates
are file:line errors that --skip-invalid skips (and reports); prompts come from a file or stdin and must be
UTF-8; usage and internal errors are one line. Fuzzing: only the project's own errors escape the JSONL reader,
the config loader, the safetensors header reader and the sampling options."""

import json
import math
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dh_mlx import CheckpointError
from dh_mlx.config import load_config
from dh_mlx.checkpoint.layout import read_safetensors_header
from dh_mlx.train.data import DataError, DataSummary, read_jsonl
from helpers import cli as run_cli

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cli(*args, stdin=None, env=None):  # bytes: the tests feed and read invalid UTF-8
    return run_cli(*args, stdin=stdin, env=env, timeout=120, text=False)


def one_line(r) -> str:
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err, err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert err.rstrip().endswith(line)
    return line


def test_hostile_jsonl_records_are_file_line_errors_that_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text('{"text": "fine"}\n' + deep + '\n{"text": "a\\ud800b"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: JSON nested too deeply"):
        list(read_jsonl(path))
    summary = DataSummary()
    got = [r.parts[0].text for r in read_jsonl(path, skip_invalid=True, summary=summary)]
    assert got == ["fine", "also fine"]
    assert summary.skipped == {"nested too deeply": 1, "lone surrogate": 1}
    text = str(summary)
    assert f"first: {path}:2: JSON nested too deeply; {path}:3: the text holds a lone surrogate U+D800" in text


def test_skip_invalid_says_where_from_the_cli(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n' + "\n".join(json.dumps({"text": f"line {i} " * 30})
                                                         for i in range(60)) + "\n")
    r = cli("tokenizer", "train", "--data", str(path), "--out", str(tmp_path / "tok"), "--vocab-size", "300")
    assert f"{path}:1: the text holds a lone surrogate U+D800 at character 1" in one_line(r)


@pytest.mark.slow
def test_prompts_from_a_file_or_stdin_and_never_broken_utf8(tmp_path):
    from dh_mlx.config import DATA_DIR
    from dh_mlx.tokenizer import load_tokenizer
    text = "The licence grants \u00e9 \U0001F600"
    n = len(load_tokenizer(DATA_DIR / "tokenizer").encode(text, bos=True))
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    r = cli("generate", "--params", "tiny", "--prompt-file", str(tmp_path / "p.txt"), "--max-tokens", "2")
    assert r.returncode == 0 and f"prompt: {n} tokens".encode() in r.stderr, r.stderr
    r = cli("generate", "--params", "tiny", "--prompt", "-", "--max-tokens", "2", stdin=text.encode())
    assert r.returncode == 0 and f"prompt: {n} tokens".encode() in r.stderr, r.stderr
    (tmp_path / "bad.txt").write_bytes(b"ok \xff no")
    assert "--prompt-file" in one_line(cli("generate", "--params", "tiny", "--prompt-file", str(tmp_path / "bad.txt")))
    assert "byte 0xFF at offset 3 is not UTF-8" in one_line(
        cli("generate", "--params", "tiny", "--prompt", "-", stdin=b"ok \xff no"))
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--params", "tiny", "--prompt", b"a\xffb"],
                       capture_output=True, timeout=120)
    assert "--prompt: byte 0xFF at offset 1 is not UTF-8 text" in one_line(r)


@pytest.mark.slow
def test_usage_and_internal_errors_are_one_line(monkeypatch, capsys):
    assert "Invalid value for '--steps'" in one_line(cli("train", "--steps", "x"))
    assert "No such command 'nosuch'" in one_line(cli("nosuch"))
    from dh_mlx import cli as cli_module
    import dh_mlx.info

    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(dh_mlx.info, "model_info", broken)
    monkeypatch.setattr(sys, "argv", ["dh-mlx", "info"])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "internal error KeyError" in err
    monkeypatch.setenv("DH_MLX_DEBUG", "1")
    with pytest.raises(KeyError):
        cli_module.main()


@pytest.mark.slow
@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=60), st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                       lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                           st.sampled_from(["text", "domain", "prompt", "completion", "messages",
                                                            "role", "content"]), c, max_size=3))
                          .map(lambda o: json.dumps(o).encode())), max_size=6))
def test_fuzz_jsonl_reader_raises_only_data_errors(tmp_path, lines):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(l.replace(b"\n", b" ") for l in lines) + b"\n")
    try:
        records = list(read_jsonl(path, domains=["code"]))
    except DataError as e:
        assert str(e).startswith(f"{path}:")
        return
    for r in records:
        assert all(isinstance(p.text, str) and p.text.encode("utf-8") is not None for p in r.parts)
    assert list(read_jsonl(path, skip_invalid=True, domains=["code"])) is not None


@pytest.mark.slow
@FUZZ
@given(st.dictionaries(st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts",
                                        "tie_word_embeddings", "rope_scaling", "domain_routing", "model_type",
                                        "eos_token_id", "q_lora_rank", "rms_norm_eps", "quantization"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-5, 10**10) | st.floats() |
                                    st.text(max_size=6), lambda c: st.lists(c, max_size=3) |
                                    st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)))
def test_fuzz_config_loader_raises_only_value_errors(tmp_path, changes):
    from dh_mlx import ModelConfig
    (tmp_path / "config.json").write_text(json.dumps({**ModelConfig().to_dict(), **changes}))
    try:
        load_config(tmp_path)
    except ValueError as e:
        assert str(e).startswith(str(tmp_path / "config.json"))


@FUZZ
@given(st.one_of(st.binary(max_size=80), st.builds(
    lambda header, tail: struct.pack("<Q", len(header)) + header + tail,
    st.recursive(st.none() | st.integers(-3, 2**40) | st.sampled_from(["F32", "BF16", "I8", "X"]),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(
                     st.sampled_from(["w", "dtype", "shape", "data_offsets", "__metadata__"]), c, max_size=4))
    .map(lambda o: json.dumps(o).encode()), st.binary(max_size=64))))
def test_fuzz_safetensors_header_reader_raises_only_checkpoint_errors(tmp_path, blob):
    f = tmp_path / "model.safetensors"
    f.write_bytes(blob)
    try:
        header = read_safetensors_header(f)
    except CheckpointError as e:
        assert str(e).startswith(str(f))
        return
    assert isinstance(header, dict)


@FUZZ
@given(temp=st.floats(allow_nan=True), top_p=st.floats(allow_nan=True), top_k=st.integers(-3, 10**6),
       min_p=st.floats(allow_nan=True), penalty=st.floats(allow_nan=True), seed=st.integers(-3, 2**64))
def test_fuzz_sampling_options_are_either_valid_or_a_named_value_error(temp, top_p, top_k, min_p, penalty, seed):
    from dh_mlx.generation.options import SamplingOptions
    try:
        SamplingOptions(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=penalty, seed=seed)
    except ValueError as e:  # the library names the argument (the CLI turns it into the flag)
        assert str(e).split(" ")[0] in ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed"), e
        return
    assert math.isfinite(temp) and temp >= 0 and 0 < top_p <= 1 and 0 <= min_p <= 1 and penalty > 0
    assert 0 <= seed < 2**63