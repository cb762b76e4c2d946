"""The reference path (what Metal runs: every replaceable operation as its plain-MLX body) end to end on the
CPU, with the CPU backend off: the same training losses, logits and greedy tokens as with it on."""

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import ops, random_model
from dh_mlx.generation import generate_tokens
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.trainer import build_steps, make_optimizer
from helpers import make_config, randomise_for_parity, tokens
from test_train import fixed_batch

REPLACED = {"linear", "rms_norm", "rope", "swiglu", "attention", "absorbed_attention", "route", "routed_experts",
            "weighted_experts", "cross_entropy", "squared_norm", "quantized_linear"}


def test_the_cpu_backend_replaces_every_operation_and_can_be_turned_off():
    assert ops.registered().keys() == REPLACED  # conftest set the backend up, as the CLI does
    with ops.reference_only():
        assert ops.registered() == {}
    assert ops.registered().keys() == REPLACED


def train_losses(steps: int = 4) -> list[float]:
    config = make_config()
    model = random_model(config, seed=0)
    model.freeze(keys=["e_score_correction_bias"], strict=False)
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=0, balance_alpha=0.1)
    fns = build_steps(model, make_optimizer(cfg), cfg)
    batch = fixed_batch(config, B=4, T=16, seed=5)
    out = []
    for _ in range(steps):
        loss, *_ = fns.step(*batch)
        fns.eval(loss)
        out.append(loss.item())
    return out


def test_training_steps_on_the_reference_path_give_the_backends_losses():
    fast = train_losses()
    with ops.reference_only():
        reference = train_losses()
    assert fast[-1] < fast[0] - 0.1  # the steps train
    np.testing.assert_allclose(reference, fast, rtol=2e-4)


@pytest.mark.parametrize("mtp", [False, True])
def test_generation_on_the_reference_path_gives_the_backends_tokens(mtp):
    model = randomise_for_parity(random_model(make_config(), seed=1), 1)
    prompt = tokens(40, model.config.vocab_size, seed=2, batch=1)[0].tolist()
    ids = mx.array([prompt])
    fast_logits, fast = model(ids), list(generate_tokens(model, prompt, max_tokens=12, mtp=mtp))
    with ops.reference_only():
        ref_logits, reference = model(ids), list(generate_tokens(model, prompt, max_tokens=12, mtp=mtp))
    np.testing.assert_allclose(np.array(ref_logits), np.array(fast_logits), atol=2e-4, rtol=1e-4)
    assert reference == fast
