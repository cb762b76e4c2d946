"""A user's first hour, through the CLI: the presets generate, model and tokenizer vocabularies are reconciled,
run directories stay small and a run's log reads well when it is not on a terminal."""

import json
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import random_model, save_model
from dh_mlx.generation import generate_tokens
from dh_mlx.generation.options import SamplingOptions
from dh_mlx.generation.speculative import DraftPolicy
from dh_mlx.tokenizer import load_tokenizer
from dh_mlx.train.tokenizer import train_tokenizer
from dh_mlx.train.report import directory_bytes
from helpers import cli, corpus_lines, make_config


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-hour")
    data = root / "corpus.jsonl"
    data.write_text("\n".join(corpus_lines(240)) + "\n")
    tok = train_tokenizer(data, root / "tok", vocab_size=400)
    return data, root / "tok", tok


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "1b"])
def test_each_preset_generates_from_the_cli(preset):
    # 1b's vocabulary (32768) is padded past the bundled tokenizer's 8192 pieces
    r = cli("generate", "--params", preset, "--prompt", "The future of AI in emerging markets is",
            "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    n = int(re.search(r"generation: (\d+) tokens", r.stderr).group(1))
    assert n >= 1 and r.stdout.strip()


def test_a_preset_that_does_not_fit_is_refused_with_what_would(monkeypatch, capsys):
    from dh_mlx.cli import main
    monkeypatch.setattr("dh_mlx.checkpoint.weights.available_memory", lambda: 16 * 2**30)
    monkeypatch.setattr(sys, "argv", ["dh-mlx", "generate", "--params", "5b", "--prompt", "hi"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # 5.4 B parameters: 20.1 GiB in float32 does not fit 0.9 x 16 GiB, bfloat16's 10.0 GiB does
    assert err.startswith("error: preset '5b'") and "20.1 GiB as float32" in err
    assert "--dtype bfloat16 (10.0 GiB" in err and "a smaller preset: 1b" in err and "quantize" not in err


def _padded_model(tok, tmp_path):
    """A model with 64 rows past the tokenizer whose head rows win every argmax unless they are masked."""
    V = tok.vocab_size
    model = random_model(make_config(vocab_size=V + 64), seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    u = rng.normal(size=(32, model.config.hidden_size)).astype(np.float32)
    loud = np.concatenate([u, -u]) * 1000  # +-u: one of each pair lines up with any hidden state
    for head in (model.lm_head, model.model.mtp_layers[0].shared_head.head):
        w = np.array(head.weight)
        w[V:] = loud
        head.weight = mx.array(w)
    mx.eval(model.parameters())
    save_model(model, tmp_path / "padded")
    for f in tok.path.parent.iterdir():
        shutil.copyfile(f, tmp_path / "padded" / f.name)
    return model, tmp_path / "padded"


@pytest.mark.slow
def test_ids_past_the_tokenizer_are_never_sampled(corpus, tmp_path):
    tok = corpus[2]
    model, path = _padded_model(tok, tmp_path)
    prompt = tok.encode("the model token", bos=True)
    unmasked = list(generate_tokens(model, prompt, max_tokens=4, mtp=False))
    assert all(t >= tok.vocab_size for t in unmasked)  # the test's premise: the padded rows would win
    limited = SamplingOptions(vocab_limit=tok.vocab_size)
    for opts in (dict(mtp=False), dict(sampling=limited.replace(temp=1.0, seed=3), mtp=False),
                 dict(mtp=DraftPolicy(adaptive=False)), dict(mtp=True, sampling=limited.replace(temp=1.0, seed=3))):
        ids = list(generate_tokens(model, prompt, max_tokens=12, **{"sampling": limited, **opts}))
        assert len(ids) >= 1 and max(ids) < tok.vocab_size, opts
    for extra in ([], ["--temp", "1.0"], ["--no-mtp"]):
        r = cli("generate", "--model", str(path), "--prompt", "the model", "--max-tokens", "6", *extra)
        assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_model_is_refused_with_both_numbers(corpus, tmp_path):
    data, tok_dir, tok = corpus
    small = random_model(make_config(vocab_size=tok.vocab_size - 10), seed=0, dtype="float32")
    save_model(small, tmp_path / "small")
    for f in tok_dir.iterdir():
        shutil.copyfile(f, tmp_path / "small" / f.name)
    needle = f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is {tok.vocab_size - 10}"
    assert needle in one_line_error(cli("generate", "--model", str(tmp_path / "small"), "--prompt", "x"))
    assert needle in one_line_error(cli("lora", "--model", str(tmp_path / "small"), "--data", str(data),
                                        "--out", str(tmp_path / "lora"), "--steps", "1"))
    config = tmp_path / "small" / "config.json"
    assert needle in one_line_error(cli("train", "--config", str(config), "--tokenizer", str(tok_dir),
                                        "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"))
    assert not (tmp_path / "lora").exists() and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def short_run(corpus, tmp_path_factory):
    """`dh-mlx train --tokenizer T` for 4 steps with a checkpoint at each, stdout and stderr in one pipe."""
    data, tok_dir, tok = corpus
    out = tmp_path_factory.mktemp("run") / "tiny"
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "train", "--tokenizer", str(tok_dir), "--data",
                        str(data), "--out", str(out), "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                        "--warmup", "1", "--eval-every", "2", "--save-every", "1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout
    return out, r.stdout, tok


@pytest.mark.slow
def test_train_sizes_a_new_models_vocabulary_from_its_tokenizer(short_run, corpus, tmp_path):
    out, _, tok = short_run
    assert json.loads((out / "config.json").read_text())["vocab_size"] == tok.vocab_size == 400
    assert load_tokenizer(out).vocab_size == 400
    r = cli("generate", "--model", str(out), "--prompt", "the model", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    # a config file keeps its own (larger: padded) vocabulary
    config = make_config(vocab_size=512).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(config))
    data, tok_dir, _ = corpus
    r = cli("train", "--config", str(tmp_path / "c.json"), "--tokenizer", str(tok_dir), "--data", str(data),
            "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == 512


@pytest.mark.slow  # a subprocess
def test_a_run_keeps_only_its_newest_checkpoint_and_prints_its_size(short_run):
    out, log, _ = short_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_000004"]
    size = re.search(rf"{re.escape(str(out))} holds ([\d.]+) MB", log)
    assert size, log
    assert float(size.group(1)) == pytest.approx(directory_bytes(out) / 1e6, abs=0.06)


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_newest_k(corpus, tmp_path):
    data, tok_dir, _ = corpus
    r = cli("train", "--tokenizer", str(tok_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--steps",
            "3", "--batch-size", "2", "--seq-len", "32", "--save-every", "1", "--keep-checkpoints", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == \
        ["step_000002", "step_000003"]


@pytest.mark.slow  # a subprocess
def test_a_log_off_a_terminal_is_plain_lines(short_run):
    _, log, _ = short_run
    assert "\r" not in log and "\x1b[" not in log and "━" not in log, log
    steps = [int(m) for m in re.findall(r"^step (\d+)/4: ce ", log, flags=re.M)]
    assert steps == [1, 4], log  # the first step, every tenth (none here), the last
    assert len(re.findall(r"^step [24]: val loss ", log, flags=re.M)) == 2
    assert log.rstrip().splitlines()[-1].startswith("finished step 4:")


@pytest.mark.parametrize("times, words", [((3.0, 1.0), "cannot pay at any acceptance"),
                                          ((0.8, 1.0), "pays at any acceptance"),
                                          ((1.5, 1.0), "pays above 50% acceptance")])
def test_the_break_even_is_printed_only_as_a_probability(times, words):
    policy = DraftPolicy()
    policy.times["draft"].append(times[0])
    policy.times["plain"].append(times[1])
    text = policy.summary()
    assert words in text
    shown = [int(p) for p in re.findall(r"(-?\d+)%", text)]
    assert all(0 <= p <= 100 for p in shown), text


def test_gguf_writers_say_which_type_they_wrote(corpus, tmp_path):
    from dh_mlx.config import REPO_DIR
    _, path = _padded_model(corpus[2], tmp_path)
    r = cli("convert", "gguf", "--model", str(path), "--out", str(tmp_path / "a.gguf"), "--outtype", "f32")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'a.gguf'}: f32 (" in r.stderr
    r = subprocess.run([sys.executable, str(REPO_DIR / "convert" / "convert_to_gguf.py"), "--model-dir", str(path),
                        "--out", str(tmp_path / "b.gguf"), "--outtype", "f16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'b.gguf'}: f16 (" in r.stderr


@pytest.mark.parametrize("command, target", [("train", "dh_mlx.train.run.train"),
                                             ("lora", "dh_mlx.train.lora_run.lora")])
def test_the_cli_leaves_every_unset_training_option_to_the_library(monkeypatch, command, target):
    """Defaults are written once, in TrainConfig / LORA_DEFAULTS / LoRAConfig: the command passes only what it
    was given, so `dh-mlx train` and `train()` run the same step with the same options."""
    from dh_mlx.cli import main

    import typer
    calls = []

    def capture(**kwargs):
        calls.append(kwargs)
        raise typer.Exit(0)

    monkeypatch.setattr(target, capture)
    base = ["dh-mlx", command] + (["--model", "m", "--data", "d.jsonl"] if command == "lora" else [])
    for extra in ([], ["--steps", "7", "--lr", "0.01"]):
        monkeypatch.setattr(sys, "argv", base + extra)
        with pytest.raises(SystemExit):
            main()
    training = {"steps", "batch_size", "seq_len", "lr", "warmup_steps", "seed", "eval_every", "save_every",
                "keep_checkpoints", "grad_accum", "alf_gamma", "balance_alpha", "mtp_lambda", "rank", "alpha",
                "dropout"}
    assert not training & calls[0].keys(), calls[0]
    assert {k: calls[1][k] for k in training & calls[1].keys()} == {"steps": 7, "lr": 0.01}


def test_a_library_error_names_arguments_and_the_cli_names_its_flags(tmp_path, monkeypatch, capsys):
    from dh_mlx.cli import as_flags, main
    from dh_mlx.outputs import OutputError, check_output_dir
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        check_output_dir(tmp_path / "taken")
    assert str(e.value).endswith("pass `force=True` to write over it, or choose another `out`")
    assert as_flags(str(e.value)).endswith("pass --force to write over it, or choose another --out")
    assert as_flags("with `mtp=False`") == "with --no-mtp"
    assert as_flags('`domain="auto"` needs, `bits=4` or `batch_size=2` `grad_accum=8`, `config.json`') == \
        '--domain auto needs, --bits 4 or --batch-size 2 --grad-accum 8, `config.json`'
    monkeypatch.setattr(sys, "argv", ["dh-mlx", "info", "--plan", "--link", "pigeon"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().startswith("error: --link must be one of 10gbe, ")
