"""The reference path (what Metal runs: every replaceable operation as its plain-MLX body) end to end on the
CPU, with the CPU backend off: the same training losses, logits and greedy tokens as with it on."""

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import ops, random_model
from dh_mlx.generation import generate_tokens
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.trainer import build_steps, make_optimizer
from helpers import fixed_batch, make_config, randomise_for_parity, tokens

REPLACED = {"linear", "rms_norm", "rope", "swiglu", "attention", "absorbed_attention", "route", "routed_experts",
            "weighted_experts", "cross_entropy", "squared_norm", "quantized_linear", "quantized_embedding"}


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


@pytest.mark.slow
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


def _arrays(seed: int, *shapes):
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    return [mx.random.normal(s, key=k) for s, k in zip(shapes, keys)]


def _cases():
    """(operation, differentiable inputs, fixed arguments) at decode size (native nodes) and at prefill size."""
    H, n, p, r, v = 4, 16, 8, 32, 12
    for rows in (3, 200):
        x, w, g = _arrays(rows, (rows, 48), (40, 48), (48,))
        yield "linear", [x, w], []
        yield "rms_norm", [x, g + 2], [1e-6]
        yield "swiglu", [x, x[::-1] * 0.5], []
        wl = mx.array(10000.0 ** (np.arange(0, 8, 2) / 8).astype(np.float32))
        yield "rope", [x.reshape(1, 2 if rows == 200 else 1, -1, 24)[..., :16]], [3, wl, 8, False, 1.3]
        L, S = (1, 9) if rows == 3 else (40, 40)
        q, k, vv = _arrays(rows + 1, (2, H, L, 24), (2, H, S, 24), (2, H, S, 12))
        yield "attention", [q, k, vv], [0.3, "causal" if L == S else None]
        yield "attention", [q, k, vv], [0.3, mx.array(np.random.default_rng(rows).random((1, 1, L, S)) > 0.3)]
        qn, qp, lat, kpe, kvb = _arrays(rows + 2, (1, H, L, n), (1, H, L, p), (1, 1, S, r), (1, 1, S, p),
                                        (H * (n + v), r))
        yield "absorbed_attention", [qn, qp, lat, kpe, kvb * 0.2], [0.25, "causal" if L > 1 else None]
        logits, = _arrays(rows + 3, (rows, 50))
        yield "cross_entropy", [logits * 5], [mx.array(np.random.default_rng(rows).integers(0, 50, rows))]


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_each_cpu_operation_equals_its_reference_in_value_and_gradient(case):
    name, inputs, fixed = case
    cot = mx.random.normal(ops.reference(name)(*inputs, *fixed).shape, key=mx.random.key(9))

    def value_and_grads(fn):
        (out,), grads = mx.vjp(lambda *a: fn(*a, *fixed), inputs, [cot])
        return out, grads

    (got, got_grads), (want, want_grads) = value_and_grads(ops.registered()[name]), value_and_grads(ops.reference(name))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=5e-5, rtol=1e-4)
    assert np.abs(np.array(want)).max() > 1e-3
