"""The twin's FSDP2 trainer (`torchrun -m dh_mlx.torch.train`), two ranks on CPU with gloo: the losses of one
process on the same global batch (masked prompts and chat turns, so the ranks' token counts differ; micro-batches
accumulated), and a model directory that dh-mlx loads with the twin's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from helpers import free_port, model_with_tokenizer, tokens, write_records

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.slow  # (not in the quick tier, pytest -m "not slow")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model = model_with_tokenizer(root)
    write_records(root / "mixed.jsonl", n=60)  # prompts and chat turns masked: the ranks' token counts differ
    return model, root / "mixed.jsonl"


def run(model, data, out, batch, ranks=1):
    args = ["-m", "dh_mlx.torch.train", "--init", str(model), "--data", str(data), "--out", str(out), "--steps", "4",
            "--batch-size", str(batch), "--seq-len", "32", "--lr", "3e-3", "--warmup", "1", "--grad-accum", "2"]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *args]
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_on_two_ranks_trains_as_one_process_and_writes_a_model_dh_mlx_loads(base, tmp_path):
    model, data = base
    one = run(model, data, tmp_path / "one", 4)
    two = run(model, data, tmp_path / "two", 2, ranks=2)
    assert [r["ranks"] for r in two] == [2] * 4 and one[0]["loss"] > one[-1]["loss"]
    for key in ("loss", "ce", "mtp", "balance"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5, err_msg=key)
    from dh_mlx import load_model
    from dh_mlx.torch import load_model as load_twin
    ids = tokens(vocab=400)
    twin = load_twin(tmp_path / "two", device="cpu", dtype="float32")
    with torch.no_grad():
        want = twin(torch.tensor(ids)).numpy()
    assert np.abs(np.array(load_model(tmp_path / "two")(mx.array(ids))) - want).max() <= 1e-4
    single = load_twin(tmp_path / "one", device="cpu", dtype="float32").state_dict()
    sharded = twin.state_dict()
    assert max((single[k] - sharded[k]).abs().max().item() for k in single) < 1e-4  # (steps move them ~1e-2)
    assert any(k.endswith("e_score_correction_bias") and sharded[k].abs().max() > 0 for k in sharded)
    assert (tmp_path / "two" / "tokenizer.model").is_file()
