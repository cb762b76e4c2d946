"""Files are what they seem: special files are refused at once by name, every read and every piece of work is
bounded, no model is silently wrong, and every failure is one line naming the file, field or option."""

import json
import os
import shutil
import subprocess
import time
import zipfile

import mlx.core as mx
import pytest

from dh_mlx.chat import ChatTemplateError, render
from dh_mlx.generation.options import SamplingOptions
from helpers import cli as run_cli, make_checkpoint, model_with_tokenizer


def cli(*args, stdin=None, timeout=120):  # bytes: the tests feed and read invalid UTF-8
    return run_cli(*args, stdin=stdin, timeout=timeout, text=False)

MESSAGES = [{"role": "user", "content": "hi"}]


def one_line(r, *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_with_tokenizer(tmp_path_factory.mktemp("hostile"), "m")


@pytest.fixture
def copy(model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model, d)
    return d


# ---- only regular files are read ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_fifo_where_a_file_is_expected_is_refused_at_once(copy, name):
    (copy / name).unlink()
    os.mkfifo(copy / name)
    for args in (["info", "--model", str(copy)], ["generate", "--model", str(copy), "--prompt", "hi"],
                 ["quantize", "--model", str(copy), "--out", str(copy.parent / "q")]):
        if name == "model.safetensors" and args[0] == "info":
            continue  # info reads the config alone
        tic = time.perf_counter()
        one_line(cli(*args, timeout=60), str(copy / name), "FIFO")
        assert time.perf_counter() - tic < 60
    if name == "config.json":  # and as --config
        one_line(cli("train", "--config", str(copy / name), "--steps", "1", "--out", str(copy.parent / "run")), "FIFO")
    else:
        one_line(cli("convert", "import", "--input", str(copy / name), "--config", str(copy.parent / "none.json"),
                     "--out", str(copy.parent / "imported")), "FIFO")


def test_a_config_linked_to_a_device_is_refused(copy):
    (copy / "config.json").unlink()
    (copy / "config.json").symlink_to("/dev/zero")
    one_line(cli("info", "--model", str(copy)), "character device")


def test_an_archive_member_inflating_past_its_bound_is_refused(tmp_path):
    from dh_mlx.convert.errors import ConvertError
    from dh_mlx.convert.readers import _export_config
    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/archive_format", "pt2")
        z.writestr("m/extra/config.json", b" " * (17 << 20))  # 17 MB of spaces, a few KB compressed
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ConvertError, match="would inflate to 17,825,792 bytes"):
        _export_config(path)


# ---- bounded work ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, words", [
    ("{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}", "calls"),
    ("{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}", "deep"),
    ("{{ 'x' * 10**8 }}", "built a value"),
    ("{{ 10 ** 100000 }}", "power"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "looped"),
    ("{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "built a value"),
    ("{% include 'other.jinja' %}", "no loader"),
    ("{% extends 'base.jinja' %}", "no loader"),
])
@pytest.mark.slow
def test_a_chat_template_runs_within_its_limits(template, words):
    tic = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=words) as e:
        render(template, MESSAGES, where="x/tokenizer_config.json: chat template")
    assert str(e.value).startswith("x/tokenizer_config.json: chat template: ") and "\n" not in str(e.value)
    assert time.perf_counter() - tic < 5


def bpe_dir(tmp_path, vocab: dict, pre_tokenizer=None):
    from tokenizers import Tokenizer, models
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    if pre_tokenizer is not None:
        tk.pre_tokenizer = pre_tokenizer
    tk.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.slow
def test_tokenizer_ids_past_the_vocabulary_are_refused_before_allocating(tmp_path):
    from dh_mlx.hf_tokenizer import HFTokenizer, HFTokenizerError
    d = bpe_dir(tmp_path, {"a": 0, "b": 4_000_000_000})
    with pytest.raises(HFTokenizerError, match="ids up to 4000000000; at most"):
        HFTokenizer(d)
    with pytest.raises(HFTokenizerError, match="but the model's vocab_size is 97"):
        HFTokenizer(d, vocab_size=97)


def test_a_regex_that_gives_up_is_one_line_naming_the_file(tmp_path, capfd):
    from tokenizers import Regex, pre_tokenizers
    from dh_mlx.hf_tokenizer import HFTokenizer, HFTokenizerError
    d = bpe_dir(tmp_path, {"a": 0, "!": 1}, pre_tokenizers.Split(Regex("(a+)+$"), behavior="isolated"))
    with pytest.raises(HFTokenizerError, match="tokenizer.json: tokenizing failed"):
        HFTokenizer(d).encode("a" * 40 + "!")
    assert "panicked" not in capfd.readouterr().err  # the library's backtrace is not shown


def test_a_prompt_longer_than_the_context_is_refused_before_it_is_tokenized(model):
    from dh_mlx import load
    from dh_mlx.generation import generate
    m, tok = load(model)
    text = "word " * (m.config.max_position_embeddings * tok.max_token_bytes)
    calls = []
    encode = tok.sp.encode
    tok.sp.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    with pytest.raises(ValueError, match=r"bytes, more than 512 tokens can hold"):
        generate(m, tok, text, max_tokens=1)
    assert not calls


def test_the_batch_size_search_is_quick():
    tic = time.perf_counter()
    r = cli("train", "--batch-size", "100000000", "--steps", "1", "--out", "/nonexistent/run")
    one_line(r, "would fit: --batch-size")
    assert time.perf_counter() - tic < 60


# ---- no silently wrong model -----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("factor", "Infinity"), ("mscale_all_dim", "NaN"), ("beta_fast", '"x"')])
def test_non_finite_yarn_values_are_refused_by_field(copy, key, value):
    text = (copy / "config.json").read_text()
    config = json.loads(text)
    config["rope_scaling"][key] = "@@"
    (copy / "config.json").write_text(json.dumps(config).replace('"@@"', value))
    one_line(cli("info", "--model", str(copy)), f"rope_scaling.{key}")


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    from dh_mlx import CheckpointError, load_model
    make_checkpoint(tmp_path / "m")
    w = mx.load(str(tmp_path / "m" / "model.safetensors"))
    names = sorted(w)
    first = {k: w[k] for k in names[: len(names) // 2]}
    second = {k: w[k] for k in names[len(names) // 2:]}
    second[names[0]] = w[names[0]] * 2  # also in the second shard, with other values
    (tmp_path / "m" / "model.safetensors").unlink()
    mx.save_safetensors(str(tmp_path / "m" / "model-00001-of-00002.safetensors"), first)
    mx.save_safetensors(str(tmp_path / "m" / "model-00002-of-00002.safetensors"), second)
    with pytest.raises(CheckpointError, match=f"tensor {names[0]} is in both model-00001"):
        load_model(tmp_path / "m")
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in names},
                            **{k: "model-00002-of-00002.safetensors" for k in names[len(names) // 2:]}}}
    second.pop(names[0])
    mx.save_safetensors(str(tmp_path / "m" / "model-00002-of-00002.safetensors"), second)
    index["weight_map"][names[-1]] = "model-00001-of-00002.safetensors"  # the index says elsewhere
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names 'model-00001-of-00002.safetensors' for tensor {names[-1]}"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("kind", ["nan", "int16"])
def test_convert_import_checks_values_as_loading_does(model, tmp_path, kind):
    w = mx.load(str(model / "model.safetensors"))
    name = sorted(k for k in w if k.endswith("q_a_proj.weight"))[0]
    w[name] = mx.full(w[name].shape, float("nan")) if kind == "nan" else w[name].astype(mx.int16)
    mx.save_safetensors(str(tmp_path / "in.safetensors"), w)
    one_line(cli("convert", "import", "--input", str(tmp_path / "in.safetensors"), "--config",
                 str(model / "config.json"), "--out", str(tmp_path / "out")), name)
    assert not (tmp_path / "out" / "config.json").exists()


def test_scales_wider_than_their_weight_are_refused_before_any_kernel(model, tmp_path):
    from dh_mlx.convert.mlx import quantize
    quantize(model, tmp_path / "q", bits=4, group_size=32)
    w = mx.load(str(tmp_path / "q" / "model.safetensors"))
    name = sorted(k for k in w if k.endswith("q_a_proj.scales"))[0]
    for part in ("scales", "biases"):  # 8 x wider: a group size of 0 divided MLX's kernel by zero (SIGFPE)
        k = name[: -len("scales")] + part
        w[k] = mx.concatenate([w[k]] * 8, axis=-1)
    mx.save_safetensors(str(tmp_path / "q" / "model.safetensors"), w, metadata={"format": "mlx"})
    for args in (["generate", "--model", str(tmp_path / "q"), "--prompt", "hi", "--max-tokens", "2"],
                 ["convert", "hf", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "hf")]):
        one_line(cli(*args), str(tmp_path / "q"), name, "not an MLX-quantized")


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--alf-gamma", "inf"), ("--seed", "-1"),
                                           ("--seed", str(2**64))])
def test_training_options_are_finite(option, value, tmp_path):
    one_line(cli("train", option, value, "--steps", "1", "--out", str(tmp_path / "run")), option.strip("-").replace(
        "-", "_"))
    assert not (tmp_path / "run").exists()


def test_a_nan_stop_names_a_checkpoint_that_exists(tmp_path):
    from dh_mlx.train.distributed import world
    from dh_mlx.train.trainer import _last_good
    assert _last_good(tmp_path, world()) == "the run has no checkpoint yet"


def test_a_temperature_that_underflows_samples_greedily(model):
    from dh_mlx import load
    from dh_mlx.generation import generate_tokens
    m, tok = load(model)
    prompt = tok.encode("hello there", bos=True)
    assert list(generate_tokens(m, prompt, max_tokens=6, sampling=SamplingOptions(temp=1e-45, seed=3),
                                mtp=False)) == list(
        generate_tokens(m, prompt, max_tokens=6, mtp=False))


# ---- messages ---------------------------------------------------------------------------------------------
def test_generation_seeds_outside_their_range_are_one_line(model):
    for seed in ("-1", str(2**64)):
        one_line(cli("generate", "--model", str(model), "--prompt", "hi", "--seed", seed), "seed")


def test_non_utf8_chat_input_names_the_line(model):
    one_line(cli("chat", "--model", str(model), "--max-tokens", "1", stdin=b"hello\n\xff\xfe\n"),
             "standard input, line 2: byte 0xFF at offset 0 is not UTF-8")


def test_out_of_memory_is_said_in_words():
    from dh_mlx.cli import _message
    assert _message(MemoryError()).startswith("out of memory (") and "available now" in _message(MemoryError())


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_the_free_space(model, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(full)],
                      capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        for args in (["convert", "hf", "--model", str(model), "--out", str(full / "hf")],
                     ["quantize", "--model", str(model), "--bits", "8", "--out", str(full / "q")],
                     ["convert", "gguf", "--model", str(model), "--out", str(full / "m.gguf"), "--outtype", "f32"]):
            line = one_line(cli(*args), str(full), "writing failed: the disk is full", "free)")
            assert "config.json" not in os.listdir(full / args[-1].split("/")[-1]) if args[0] != "convert" or \
                args[1] != "gguf" else True, line
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_lora_counts_its_adapters_not_the_frozen_base_for_free_space(model, tmp_path, monkeypatch):
    from dh_mlx.train import trainer
    from dh_mlx.train.lora_run import lora
    wanted, save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda *a, **k: wanted.append(k["expected_bytes"]) or save(*a, **k))
    lora(model=model, data=model.parent / "data.jsonl", out=tmp_path / "lora", steps=1, batch_size=2, seq_len=16,
         progress=False)
    base = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    adapters = (tmp_path / "lora" / "adapters.safetensors").stat().st_size
    assert wanted and wanted[0] < base and wanted[0] < 4 * adapters, (wanted, base, adapters)
