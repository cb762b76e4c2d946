"""Long work shows life and the CLI is quiet otherwise: progress for random weights and long prefills, Ctrl-C
during generation, MTP's line only when drafting was used, chat replies apart when piped, help and --version."""

import io
import re
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from dh_mlx.generation import GenerationStats
from dh_mlx.generation.steps import PromptCache, prefill
from dh_mlx.progress import ProgressHandler, log
from helpers import cli, make_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def shown():
    """Progress records as the CLI shows them off a terminal, from the first second on."""
    stream = io.StringIO()
    handler = ProgressHandler(stream, after=0.0, every=0.0)
    log.addHandler(handler)
    old = log.level
    log.setLevel("INFO")
    yield stream
    log.removeHandler(handler)
    log.setLevel(old)


def test_a_long_prefill_reports_its_tokens(shown):
    from dh_mlx import random_model
    model = random_model(make_config(max_position_embeddings=2048), seed=0)
    prefill(model, mx.arange(1, 301)[None] % 90, PromptCache.new(model).cache, step_size=128)
    assert re.findall(r"^prefill: ([\d,]+)/300 tokens", shown.getvalue(), re.M) == ["128", "256", "299"]


def test_building_random_weights_reports_its_parts(shown):
    from dh_mlx import random_model
    config = make_config()
    random_model(config, seed=0)
    parts = config.num_hidden_layers + config.num_nextn_predict_layers + 2
    done = re.findall(rf"^building random weights: (\d+)/{parts} parts", shown.getvalue(), re.M)
    assert done == [str(i) for i in range(1, parts + 1)]


def test_progress_on_a_terminal_is_one_line_rewritten_then_cleared():
    from dh_mlx.progress import Task
    stream = Terminal()
    handler = ProgressHandler(stream, after=0.0)
    log.addHandler(handler)
    log.setLevel("INFO")
    try:
        with Task("prefill", 10, "tokens") as task:
            task.advance(4)
            task.advance(6)
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().split("\r\x1b[K")[1:] == ["prefill: 4/10 tokens (0 s)", "prefill: 10/10 tokens (0 s)", ""]
    quiet = ProgressHandler(io.StringIO(), after=60.0)  # work shorter than `after` shows nothing
    log.addHandler(quiet)
    try:
        with Task("prefill", 10) as task:
            task.advance(10)
    finally:
        log.removeHandler(quiet)
    assert quiet.stream.getvalue() == ""


@pytest.mark.slow
def test_random_weights_say_so_before_they_are_built():
    r = cli("generate", "--params", "tiny", "--prompt", "Hello", "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0].startswith("note: preset 'tiny' with random (untrained) weights")


@pytest.mark.slow
def test_ctrl_c_during_generate_prints_the_text_so_far_and_the_stats():
    p = subprocess.Popen([sys.executable, "-m", "dh_mlx.cli", "generate", "--params", "tiny", "--prompt", "Hello",
                          "--max-tokens", "100000", "--no-mtp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    first = p.stdout.read(1)  # generation has started
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert first and out.endswith("\n")
    n = int(re.search(r"generation: (\d+) tokens", err).group(1))
    assert 0 < n < 100000 and err.rstrip().endswith("interrupted"), err


def test_the_mtp_line_shows_only_when_drafting_paid_or_asked(capsys):
    from dh_mlx.cli_generate import _report
    stats = GenerationStats(drafted=8, accepted=1, draft_summary="a draft step took 3.00 plain steps here: ...")
    _report(stats)
    assert "MTP" not in capsys.readouterr().err
    _report(stats, verbose=True)
    assert "MTP draft acceptance: 1/8" in capsys.readouterr().err
    stats.drafting_paid = True
    _report(stats)
    assert "MTP draft acceptance: 1/8" in capsys.readouterr().err


@pytest.mark.slow
def test_piped_chat_replies_are_apart(tmp_path):
    r = cli("chat", "--params", "tiny", "--max-tokens", "3", "--no-mtp", stdin="Hi\nAgain\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("\n\n")
    assert len(replies) == 3 and replies[2] == "" and all(replies[:2]), repr(r.stdout)
    assert len(re.findall(r"^prompt: ", r.stderr, re.M)) == 2


@pytest.mark.slow
def test_help_shows_no_bool_type_and_the_version_prints():
    from dh_mlx import __version__
    for args in (["--help"], ["train", "--help"], ["generate", "--help"], ["convert", "gguf", "--help"]):
        r = cli(*args)
        assert r.returncode == 0 and "--help" in r.stdout and "<bool>" not in r.stdout, args
        assert "the seed" not in r.stdout.replace("\n", " ").replace("│", " ")  # project jargon, not for users
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dh-mlx {__version__}"
