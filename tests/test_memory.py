"""The training memory guard: weights + gradients + AdamW state + activations, within 30 % of the measured peak
on tiny; a run that cannot fit is refused before the corpus is read, with what would fit."""

import json
import sys

import pytest

from dh_mlx.config import DATA_DIR, load_preset
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.memory import training_peak_bytes


@pytest.mark.slow
def test_the_estimate_is_within_30_percent_of_tinys_measured_peak(tmp_path):
    from dh_mlx.train.run import train
    texts = [json.loads(l)["text"] for l in (DATA_DIR / "train_data.jsonl").read_text().splitlines()[:60]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = train(params="tiny", data=tmp_path / "d.jsonl", out=tmp_path / "run", steps=3, batch_size=8, seq_len=128,
              eval_every=100, save_every=100, progress=False, warmup_steps=1)
    estimate = sum(training_peak_bytes(load_preset("tiny"), TrainConfig(batch_size=8, seq_len=128)).values())
    measured = r.peak_memory_gb * 1e9
    assert 0.7 < estimate / measured < 1.3, (estimate, measured)


def test_a_run_that_cannot_fit_is_refused_before_reading_the_corpus(monkeypatch, capsys):
    from dh_mlx.cli import main
    monkeypatch.setattr("dh_mlx.train.memory.available_memory", lambda: 1.5 * 2**30)
    monkeypatch.setattr(sys, "argv", ["dh-mlx", "train", "--params", "tiny", "--batch-size", "16",
                                      "--data", "/nonexistent/corpus.jsonl", "--out", "/nonexistent/run"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.count("\n") == 0 and "corpus" not in err  # the data was never opened
    assert err.startswith("error: training tiny with batch 16 x 128 needs about ")
    assert "weights 0.2 GiB, gradients and AdamW state 0.7 GiB, activations" in err
    b = int(err.split("would fit: --batch-size ")[1].split()[0])
    cfg = TrainConfig(batch_size=b, seq_len=128)
    assert sum(training_peak_bytes(load_preset("tiny"), cfg).values()) <= 0.9 * 1.5 * 2**30  # it does fit
    assert sum(training_peak_bytes(load_preset("tiny"), TrainConfig(batch_size=b + 1, seq_len=128)).values()) \
        > 0.9 * 1.5 * 2**30  # and is the largest that does
    assert f"--grad-accum {-(-16 // b)}" in err and "dh-mlx lora" in err and "quantiz" not in err
