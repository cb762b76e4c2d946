"""One training step of the MLX trainer and of the PyTorch twin, from the same checkpoint and batch, gives the
same loss terms and the same ALF-updated router biases."""

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.loss import Batch
from dh_mlx.train.trainer import build_steps, make_optimizer, moe_gates
from helpers import make_checkpoint

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["q_lora+groups+yarn+mtp", "no_q_lora+flat+dense0"])
def test_one_step_matches_the_twin(tmp_path, name):
    import dh_mlx.torch as twin
    from dh_mlx.torch.step import TrainConfig as TwinConfig, make_optimizer as twin_optimizer, train_step
    make_checkpoint(tmp_path, name)
    ids = np.random.default_rng(5).integers(0, 97, (3, 17))

    ours = load_model(tmp_path)
    before = [np.array(g.e_score_correction_bias) for g in moe_gates(ours)]
    ours.freeze(keys=["e_score_correction_bias"], strict=False)
    cfg = TrainConfig(steps=10, lr=1e-3, warmup_steps=0, alf_gamma=1e-3, balance_alpha=1e-2, mtp_lambda=0.3,
                      grad_clip=1e9)
    fns = build_steps(ours, make_optimizer(cfg), cfg)
    B, T = ids.shape[0], ids.shape[1] - 1
    batch = Batch(mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.ones((B, T)), mx.zeros((B, T), mx.int32),
                  mx.full((B, T), -1, mx.int32))
    loss, ce, mtp, bal, loads, _ = fns.step(*batch)
    mx.eval(loss, fns.state)

    theirs = twin.load_model(tmp_path, device="cpu", dtype=torch.float32)
    tcfg = TwinConfig(lr=1e-3, alf_gamma=1e-3, balance_alpha=1e-2, mtp_lambda=0.3)
    terms = train_step(theirs, twin_optimizer(theirs, tcfg), torch.tensor(ids), None, tcfg)

    assert terms["ce"] == pytest.approx(ce.item(), abs=1e-4)
    assert terms["mtp"] == pytest.approx(mtp.item(), abs=1e-4)
    assert 1e-2 * terms["balance"] == pytest.approx(bal.item(), abs=1e-6)
    assert terms["loss"] == pytest.approx(loss.item(), abs=1e-4)
    twin_biases = [m.gate.e_score_correction_bias.numpy() for m in theirs.moe_layers()]
    our_biases = [np.array(g.e_score_correction_bias) for g in moe_gates(ours)]
    assert len(twin_biases) == len(our_biases) > 0
    for a, b in zip(our_biases, twin_biases):
        np.testing.assert_allclose(a, b, atol=1e-7)
    steps = np.concatenate([(a - b0) / 1e-3 for a, b0 in zip(our_biases, before)])
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # each bias moved by -gamma, 0 or +gamma
    assert set(np.round(steps).astype(int)) <= {-1, 0, 1} and np.abs(steps).max() > 0.5
