"""Training: the ALF rule, the balance loss, loss falling on a fixed batch, and bit-identical resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from dh_mlx import ops, random_model
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.loss import alf_update, balance_loss, document_mask
from dh_mlx.train.trainer import build_steps, make_optimizer, moe_gates
from dh_mlx.model.moe import Routing
from helpers import fixed_batch, make_config


def test_alf_moves_each_bias_by_gamma_towards_balance():
    biases = [mx.zeros((4,)), mx.array([0.5, 0.5, 0.5, 0.5])]
    loads = mx.array([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    new = alf_update(biases, loads, 0.001)
    np.testing.assert_allclose(np.array(new[0]), [-0.001, 0.001, 0.001, 0.001])  # mean load 5
    np.testing.assert_allclose(np.array(new[1]), [0.5] * 4)  # balanced: unchanged


def test_balance_loss_matches_hand_computation():
    # one sequence of 2 tokens, 4 experts, k=1: token 0 -> expert 0, token 1 -> expert 2
    scores = mx.array([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    r = Routing(mx.array([[[0], [2]]]), mx.ones((1, 2, 1)), scores)
    valid = mx.ones((1, 2))
    # f = 4/(1*2) * [1,0,1,0] = [2,0,2,0]; P = mean([.5,.25,.25,0], [0,0,.5,.5]) = [.25,.125,.375,.25]
    assert balance_loss([r], valid, 4, 1).item() == pytest.approx(2 * 0.25 + 2 * 0.375)


def test_document_mask_blocks_attention_across_documents():
    m = np.array(document_mask(mx.array([[0, 0, 1, 1, 1]])))[0, 0]
    assert m[1, 0] and not m[2, 1] and m[4, 2] and not m[0, 1]


@pytest.mark.slow
def test_steps_reduce_loss_on_a_fixed_batch_and_move_biases():
    config = make_config()
    model = random_model(config, seed=0)
    model.freeze(keys=["e_score_correction_bias"], strict=False)
    cfg = TrainConfig(steps=30, lr=3e-3, warmup_steps=0, alf_gamma=1e-3)
    opt = make_optimizer(cfg)
    fns = build_steps(model, opt, cfg)
    batch = fixed_batch(config)
    losses = []
    for _ in range(30):
        loss, ce, mtp, bal, loads, norm = fns.step(*batch)
        mx.eval(loss, fns.state)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    biases = np.array(moe_gates(model)[0].e_score_correction_bias)
    assert np.abs(biases).max() > 0 and np.all(np.abs(biases) <= 30 * 1e-3 + 1e-7)
    # each step moved every bias by exactly +-gamma or 0: the total is a multiple of gamma
    np.testing.assert_allclose(biases / 1e-3, np.round(biases / 1e-3), atol=1e-3)


def test_batch_split_over_two_streams_gives_the_one_pass_loss_and_gradients(monkeypatch):
    """The CPU step splits the rows over two streams; the halves' shares must add up to the batch's loss
    and gradients, also when the halves hold different numbers of masked-in tokens and MTP targets."""
    from dh_mlx import backend
    if backend.training_streams() is None:
        pytest.skip("one core or a GPU: no split")
    config = make_config()
    batch = fixed_batch(config, B=5, T=16, seed=3)  # halves of 3 and 2 rows
    mask = np.ones((5, 16), np.float32)
    mask[0, :12] = 0  # the first half has far fewer targets than the second
    mask[3, ::3] = 0
    segments = np.zeros((5, 16), np.int32)
    segments[1, 7:] = 1
    batch = batch._replace(loss_mask=mx.array(mask), segment_ids=mx.array(segments))
    results = []
    for split in (True, False):
        model = random_model(config, seed=0)
        model.freeze(keys=["e_score_correction_bias"], strict=False)
        cfg = TrainConfig(steps=1, batch_size=5, seq_len=16, balance_alpha=0.1, mtp_lambda=0.3)
        fns = build_steps(model, make_optimizer(cfg), cfg, **({} if split else {"streams": None}))
        assert fns.blas_threads == (1 if split else None)
        *values, grads = fns.grads(*batch)
        fns.eval(values, grads)
        results.append((values, dict(tree_flatten(grads))))
    (v_split, g_split), (v_one, g_one) = results
    for a, b in zip(v_split, v_one):  # loss, ce, mtp, balance, expert loads
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-5, atol=1e-7)
    assert float(v_one[3]) > 0 and float(v_one[2]) > 0  # the balance and MTP terms are in play
    assert g_split.keys() == g_one.keys()
    for k in g_one:
        np.testing.assert_allclose(np.array(g_split[k]), np.array(g_one[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_widen_eval_order_sets_a_wide_order_unless_the_user_chose_one():
    """The two-stream step needs MLX to interleave the halves' work (see streams.widen_eval_order)."""
    code = ("import os; from dh_mlx.backend.cpu.streams import widen_eval_order, wide_eval_order; w = wide_eval_order(); "
            "print(w, widen_eval_order(), os.environ['MLX_BFS_MAX_WIDTH'])")
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "1000"]  # MLX's default (20) is narrow
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MLX_BFS_MAX_WIDTH": "64"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False", "False", "64"]


@pytest.mark.parametrize("case", ["narrow", "set up before"])
def test_no_split_without_a_wide_eval_order(case):
    """A user's MLX_BFS_MAX_WIDTH=20, or a process whose backend was set up (its first eval) before training
    asked for the wide order: MLX keeps the narrow order, so the step runs in one pass."""
    code = ("from dh_mlx import backend\n" + ("backend.setup()\n" if case == "set up before" else "") +
            "backend.setup(training=True)\n"
            "from dh_mlx import random_model\nfrom dh_mlx.train.config import TrainConfig\n"
            "from dh_mlx.train.trainer import build_steps, make_optimizer\nfrom helpers import make_config\n"
            "cfg = TrainConfig(steps=1, batch_size=4)\n"
            "print(build_steps(random_model(make_config(), seed=0), make_optimizer(cfg), cfg).blas_threads)\n")
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    if case == "narrow":
        env["MLX_BFS_MAX_WIDTH"] = "20"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent, timeout=300)
    assert out.stdout.split()[-1] == "None"


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(small_run_inputs):
    from dh_mlx.train.run import train
    d = small_run_inputs
    common = dict(config=d / "config.json", data=d / "data.jsonl", tokenizer=d / "tok", steps=6, batch_size=2,
                  seq_len=16, eval_every=3, save_every=100, progress=False, warmup_steps=1)
    assert train(out=d / "full", **common).step == 6
    part = train(out=d / "part", stop_after=3, **common)
    assert part.interrupted and part.step == 3
    resumed = train(out=d / "part", resume=True, **common)
    assert resumed.step == 6
    a = [json.loads(l)["loss"] for l in (d / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l)["loss"] for l in (d / "part" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 6
    assert a == b  # bit-identical losses
    from dh_mlx import load_model
    m1, m2 = load_model(d / "full"), load_model(d / "part")
    ids = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(m1(ids), m2(ids)).item()
    from dh_mlx.outputs import OutputError
    with pytest.raises(OutputError, match="`resume=True`"):
        train(out=d / "full", **common)


@pytest.mark.slow
def test_grad_accumulation_and_a_non_finite_loss_stops_keeping_the_last_checkpoint(small_run_inputs):
    from dh_mlx.train.run import train
    from dh_mlx.train.trainer import TrainingError
    d = small_run_inputs
    common = dict(config=d / "config.json", data=d / "data.jsonl", tokenizer=d / "tok", batch_size=2, seq_len=16,
                  progress=False, warmup_steps=0)
    r = train(out=d / "accum", steps=2, grad_accum=2, eval_every=2, **common)
    assert r.step == 2 and np.isfinite(r.train_loss)
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        train(out=d / "nan", steps=50, lr=1e12, grad_clip=1e30, save_every=1, eval_every=100, **common)
    from dh_mlx.checkpoint.training import latest_checkpoint
    good = latest_checkpoint(d / "nan")
    assert good is not None and json.loads((good / "trainer_state.json").read_text())["step"] >= 1


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(small_run_inputs, monkeypatch):
    import dh_mlx.train.trainer as trainer
    from dh_mlx.checkpoint.training import latest_checkpoint
    from dh_mlx.train.run import train
    d = small_run_inputs
    common = dict(config=d / "config.json", data=d / "data.jsonl", tokenizer=d / "tok", steps=5, batch_size=2,
                  seq_len=16, eval_every=100, save_every=100, progress=False, warmup_steps=1)
    real, calls = trainer.to_mx, []

    def interrupt_third(batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(trainer, "to_mx", interrupt_third)
    r = train(out=d / "ctrl_c", **common)
    assert r.interrupted and r.step == 2
    ckpt = latest_checkpoint(d / "ctrl_c")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(trainer, "to_mx", real)
    resumed = train(out=d / "ctrl_c", resume=True, **common)
    assert resumed.step == 5 and not resumed.interrupted
    straight = train(out=d / "ctrl_c_straight", **common)
    losses = [[json.loads(l)["loss"] for l in (d / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("ctrl_c", "ctrl_c_straight")]
    assert losses[0] == losses[1] and len(losses[0]) == 5  # the interrupted step's batch was not skipped
    assert straight.step == 5


@pytest.mark.parametrize("kernels", ["native", "mlx"])
@pytest.mark.parametrize("two_streams", [True, False])
def test_cross_entropy_value_and_gradient_match_mlx(monkeypatch, two_streams, kernels):
    """Our CE (native one-pass kernels keeping the log-sum-exp, or MLX ops keeping the probabilities; rows
    split over two streams or not): value and gradient must equal MLX's."""
    import mlx.nn as nn
    from dh_mlx import backend
    from dh_mlx.backend.cpu import native, training
    streams = backend.setup().streams if two_streams else None
    cross_entropy = training.make(streams)["_cross_entropy_parts"]
    if kernels == "mlx":
        monkeypatch.setattr(native, "usable", lambda *a: None)
    else:
        assert native.load() is not None, native.status
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((3, 7, 50), dtype=np.float32) * 20)  # large: needs the max shift
    targets = mx.array(rng.integers(0, 50, (3, 7)))
    weights = mx.array(rng.random((3, 7), dtype=np.float32))
    ours = lambda x: (cross_entropy(x, targets)[0] * weights).sum()  # noqa: E731
    theirs = lambda x: (nn.losses.cross_entropy(x, targets, reduction="none") * weights).sum()  # noqa: E731
    (v1, g1), (v2, g2) = mx.value_and_grad(ours)(logits), mx.value_and_grad(theirs)(logits)
    np.testing.assert_allclose(v1.item(), v2.item(), rtol=1e-6)
    np.testing.assert_allclose(np.array(g1), np.array(g2), atol=1e-6)
    assert np.abs(np.array(g1)).max() > 1e-2
    _, k1, k2 = cross_entropy(logits, targets)
    assert (k2.shape[0] > 0) == (streams is not None)
    kept = np.concatenate([np.array(k1), np.array(k2)])
    want = mx.logsumexp(logits, axis=-1).reshape(21) if kernels == "native" else mx.softmax(logits, axis=-1).reshape(21, 50)
    np.testing.assert_allclose(kept, np.array(want), atol=1e-5 if kernels == "native" else 1e-6, rtol=1e-6)


def test_native_cross_entropy_over_a_vocabulary_sized_row():
    """The one-pass kernel over 8K-wide rows (16-lane partial max and sums, a tail) against float64 numpy:
    as accurate as float32 allows (MLX's own ops measure ~1.2e-5 off on this gradient, these ~1.3e-6)."""
    from dh_mlx.train.loss import cross_entropy
    assert "cross_entropy" in ops.registered()
    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((2, 5, 8203), dtype=np.float32) * 4
    t = rng.integers(0, 8203, (2, 5))
    value, grad = mx.value_and_grad(lambda x: cross_entropy(x, mx.array(t)).sum())(mx.array(x32))
    x = x32.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    want = np.exp(x - lse[..., None])
    np.put_along_axis(want, t[..., None], np.take_along_axis(want, t[..., None], -1) - 1, -1)
    np.testing.assert_allclose(value.item(), (lse - np.take_along_axis(x, t[..., None], -1)[..., 0]).sum(), rtol=1e-6)
    np.testing.assert_allclose(np.array(grad), want, atol=4e-6)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping active / inactive
def test_streamed_adamw_with_folded_clipping_equals_mlx(max_norm):
    """Our AdamW (clip factor folded into the update, parameters spread over two streams) must update like
    optim.clip_grad_norm followed by optim.AdamW, over several steps."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from dh_mlx.train.optim import AdamW

    def net():
        mx.random.seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 8, bias=False), nn.Linear(8, 3))

    ours, ref = net(), net()
    opt_ours = AdamW(learning_rate=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    opt_ref = optim.AdamW(learning_rate=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    x = mx.array(np.random.default_rng(0).standard_normal((5, 16), dtype=np.float32))
    grad = lambda m: nn.value_and_grad(m, lambda m: (m(x) ** 2).sum())(m)[1]  # noqa: E731
    for _ in range(3):
        norm = opt_ours.clip_and_update(ours, grad(ours), max_norm)
        clipped, ref_norm = optim.clip_grad_norm(grad(ref), max_norm)
        opt_ref.update(ref, clipped)
        np.testing.assert_allclose(norm.item(), ref_norm.item(), rtol=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(ours.parameters()), tree_flatten(ref.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6, err_msg=k)


def test_adamw_refuses_bias_correction():
    """Our AdamW writes mlx's update out without bias correction; asking for it must fail, not be ignored."""
    import mlx.nn as nn
    from dh_mlx.train.optim import AdamW

    net = nn.Linear(4, 2)
    opt = AdamW(learning_rate=1e-2, bias_correction=True)
    with pytest.raises(ValueError, match="bias_correction"):
        opt.update(net, tree_map(mx.ones_like, net.trainable_parameters()))


@pytest.mark.parametrize("shape", [(1,), (37, 5), (512, 2048)])
def test_squared_norm_matches_float64(shape):
    """The gradient norm's per-parameter sum of squares (a BLAS dot on the CPU) against float64 numpy."""
    from dh_mlx.train.optim import squared_norm

    g = np.random.default_rng(len(shape)).standard_normal(shape, dtype=np.float32) * 3
    expected = (g.astype(np.float64) ** 2).sum()
    np.testing.assert_allclose(squared_norm(mx.array(g)).item(), expected, rtol=1e-5)
    np.testing.assert_allclose(squared_norm(mx.array(g).T).item(), expected, rtol=1e-5)  # a transposed view


def test_mtp_distill_targets_are_the_main_models_distribution():
    from dh_mlx.train.loss import loss_parts, masked_ce, mtp_mask
    config = make_config()
    model = random_model(config, seed=0)
    head = model.model.mtp_layers[0].shared_head.head
    # peaked distributions, so that soft and hard targets give clearly different losses
    model.lm_head.weight, head.weight = 10 * model.lm_head.weight, 30 * head.weight
    batch = fixed_batch(config)
    _, parts = loss_parts(model, batch, mtp_lambda=0.3, balance_alpha=0.0, mtp_distill=True)
    out = model.forward(batch.inputs, mask=document_mask(batch.segment_ids))
    mask = document_mask(batch.segment_ids)[..., :-1, :-1]
    m = model.mtp_forward(out.hidden[:, :-1], batch.targets[:, :-1], 0, mask=mask)
    p = np.array(mx.softmax(out.logits[:, 1:], axis=-1), np.float64)  # main model's distribution of token t+2
    logq = np.array(m.logits, np.float64)
    logq = logq - logq.max(-1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
    valid = np.array(mtp_mask(batch.loss_mask))
    expect = (-(p * logq).sum(-1) * valid).sum() / valid.sum()
    assert parts.mtp.item() == pytest.approx(expect, rel=1e-5)
    valid_mx = mtp_mask(batch.loss_mask)
    for other in (mx.argmax(out.logits[:, 1:], axis=-1), batch.targets[:, 1:]):  # greedy or data tokens differ
        assert abs(masked_ce(m.logits, other, valid_mx).item() - expect) > 1e-2


def test_soft_cross_entropy_by_hand():
    from dh_mlx.train.loss import masked_soft_ce
    q = mx.log(mx.array([[[1.0, 2.0]]]))  # softmax: 1/3, 2/3
    target = mx.log(mx.array([[[1.0, 3.0]]]))  # softmax: 1/4, 3/4
    want = -(0.25 * np.log(1 / 3) + 0.75 * np.log(2 / 3))
    assert masked_soft_ce(q, target, mx.ones((1, 1))).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_mtp_distill_trains_the_mtp_module_only_and_raises_agreement(small_run_inputs):
    from dh_mlx import load_model
    from dh_mlx.train.run import train
    d = small_run_inputs
    common = dict(data=d / "data.jsonl", tokenizer=d / "tok", batch_size=2, seq_len=16, progress=False,
                  warmup_steps=0)
    # a base model without MTP: distillation adds the module (its head and norm start as the main model's)
    base = d / "base"
    train(config=d / "config.json", out=base, steps=3, eval_every=100, mtp_lambda=0.0, **common)
    from dh_mlx.config import load_config, save_config
    save_config(load_config(base).replace(num_nextn_predict_layers=0), base)
    from dh_mlx.checkpoint.weights import save_model
    save_model(load_model(base), base, mtp=False)
    before = load_model(base)
    assert before.config.num_nextn_predict_layers == 0
    r = train(init=base, out=d / "distilled", steps=30, lr=3e-3, eval_every=1, mtp_distill=True, **common)
    after = load_model(d / "distilled")
    assert after.config.num_nextn_predict_layers == 1
    main_before = dict(tree_flatten(before.parameters()))
    main_after = dict(tree_flatten(after.parameters()))
    assert main_before.keys() <= main_after.keys()
    for k, v in main_before.items():  # the main model, routing biases included, is bit-identical
        assert mx.array_equal(v, main_after[k]).item(), k
    head = after.model.mtp_layers[0].shared_head
    assert mx.array_equal(head.head.weight, after.lm_head.weight).item()
    agreement = [h["val_mtp_agreement"] for h in r.history]
    assert agreement[-1] > agreement[0] + 0.2, agreement
    with pytest.raises(ValueError, match="`init`"):
        train(config=d / "config.json", out=d / "x", steps=1, mtp_distill=True, **common)
    with pytest.raises(ValueError, match="mtp_lambda"):
        TrainConfig(mtp_distill=True, mtp_lambda=0.0)
    from dh_mlx.convert.mlx import quantize
    quantize(base, d / "q", bits=8, group_size=32)
    with pytest.raises(ValueError, match="quantized"):
        train(init=d / "q", out=d / "y", steps=1, mtp_distill=True, **common)


def test_mtp_distill_resume_reproduces_an_uninterrupted_run(small_run_inputs):
    from dh_mlx.train.run import train
    d = small_run_inputs
    common = dict(init=d / "full", data=d / "data.jsonl", tokenizer=d / "tok", steps=4, batch_size=2, seq_len=16,
                  eval_every=2, progress=False, warmup_steps=1, mtp_distill=True)
    if not (d / "full" / "config.json").exists():
        train(config=d / "config.json", out=d / "full", data=d / "data.jsonl", tokenizer=d / "tok", steps=2,
              batch_size=2, seq_len=16, progress=False)
    train(out=d / "d_full", **common)
    assert train(out=d / "d_part", stop_after=2, **common).interrupted
    train(out=d / "d_part", resume=True, **common)
    a = [json.loads(l)["mtp"] for l in (d / "d_full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l)["mtp"] for l in (d / "d_part" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 4 and a == b


def test_a_run_says_nothing_of_replacing_its_own_exports(small_run_inputs, caplog):
    """The model is exported at every checkpoint into the run directory: only an export that replaces what the
    run did not write itself is a note (`replacing ...`), never the run's own earlier export."""
    import logging

    from dh_mlx.train.run import train
    d = small_run_inputs
    with caplog.at_level(logging.WARNING, logger="dh_mlx.notes"):
        result = train(out=d / "own", config=d / "config.json", data=d / "data.jsonl", tokenizer=d / "tok", steps=4,
                       batch_size=2, seq_len=16, eval_every=100, save_every=2, progress=False, warmup_steps=1)
    assert result.step == 4 and (d / "own" / "model.safetensors").exists()
    assert not [r for r in caplog.records if "replacing" in r.getMessage()]
