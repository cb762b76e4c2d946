import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dh_mlx import backend

backend.setup(training=True)  # as `dh-mlx train` does, before MLX's first eval: two-stream training steps

# JSONL given to train is prepared into a cache: the tests' own, not the user's (subprocesses inherit it).
os.environ["DH_MLX_DATA_CACHE"] = tempfile.mkdtemp(prefix="dh-mlx-test-data-")
atexit.register(shutil.rmtree, os.environ["DH_MLX_DATA_CACHE"], True)

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from helpers import make_bpe_tokenizer, make_config, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def small_run_inputs(tmp_path_factory):
    from dh_mlx.config import save_config
    from dh_mlx.train.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("run")
    write_corpus(d / "data.jsonl")
    train_tokenizer(d / "data.jsonl", d / "tok", vocab_size=300)
    from dh_mlx.config import DomainRouting
    save_config(make_config(vocab_size=300, domain_routing=DomainRouting(domains=["code", "math"], experts_per_domain=2)), d)
    return d
